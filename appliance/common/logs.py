"""Structured, quiet-by-default logging for every appliance process.

Each line is one event with key=value fields (logfmt), or one JSON object with
`--log-format json`, on stderr: easy for journald and for grep. The default level
is INFO, which only records lifecycle events (joins, deaths, re-plans, engine
starts); per-request and per-heartbeat detail is DEBUG.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Any

_FORMAT = os.environ.get("ANYWAY_LOG_FORMAT", "logfmt")


def _quote(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s)
    return s


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        base = {"ts": ts, "level": record.levelname.lower(), "proc": record.name, "event": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields = {**fields, "error": f"{type(exc).__name__}: {exc}"[:500]}
            frames = traceback.extract_tb(exc.__traceback__)
            if frames:  # where it was raised: what an operator pastes into a bug report
                f = frames[-1]
                fields["at"] = f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
        if self.fmt == "json":
            return json.dumps({**base, **fields}, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in {**base, **fields}.items())


class Log:
    """`log.info("node_joined", node="w1")` -> `... event=node_joined node=w1`."""

    def __init__(self, name: str) -> None:
        self._l = logging.getLogger(name)

    def _emit(self, level: int, event: str, exc: bool | BaseException = False, **fields: Any) -> None:
        if self._l.isEnabledFor(level):
            self._l.log(level, event, extra={"fields": fields}, exc_info=exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, **fields)

    def error(self, event: str, exc: bool | BaseException = False, **fields: Any) -> None:
        """`exc=True` inside an except block, or the exception itself, adds error= and at=."""
        self._emit(logging.ERROR, event, exc=exc, **fields)


def get(name: str) -> Log:
    return Log(name)


def setup(*, proc: str, level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger of this process once."""
    lvl = (level or os.environ.get("ANYWAY_LOG_LEVEL") or "info").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt or _FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, lvl, logging.INFO))
    # Libraries stay quiet unless asked.
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "asyncio", "textual"):
        logging.getLogger(noisy).setLevel(logging.WARNING if lvl != "DEBUG" else logging.DEBUG)
    os.environ.setdefault("ANYWAY_LOG_LEVEL", lvl.lower())
