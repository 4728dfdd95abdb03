"""The head ⇄ engine wire protocol: one JSON object per ZeroMQ frame, typed at both ends.

The engine is the head's child process (an ipc:// DEALER connecting to the head's
ROUTER), so this is not a network boundary, but the engine can die half-way through a
write and the head must never trust a message blindly: every frame is parsed once,
here, into one of the dataclasses below, and anything else raises `BadMessage`, which
the receiver logs and drops.

Why it lives in `common`: the head (appliance.head.engine_process) and the engine
process (appliance.engine) both speak it, and neither may import the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Union


class BadMessage(ValueError):
    """A frame that is not a valid engine-protocol message."""


# ------------------------------------------------------------------ fields
def _int(d: dict[str, Any], key: str, *, default: int | None = None, lo: int | None = None) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadMessage(f"{key!r} must be an integer")
    if lo is not None and v < lo:
        raise BadMessage(f"{key!r} must be >= {lo}")
    return v


def _float(d: dict[str, Any], key: str, *, default: float | None = None) -> float:
    v = d.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise BadMessage(f"{key!r} must be a finite number")
    return float(v)


def _str(d: dict[str, Any], key: str, *, default: str | None = None, limit: int = 4096) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise BadMessage(f"{key!r} must be a string")
    return v[:limit]


def _tokens(d: dict[str, Any], key: str) -> tuple[int, ...]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise BadMessage(f"{key!r} must be a list of token ids")
    return tuple(v)


# ---------------------------------------------------------------- messages
@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the engine picks each next token of one request."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a random seed per request

    @classmethod
    def parse(cls, d: Any) -> "Sampling":
        if not isinstance(d, dict):
            raise BadMessage("'sampling' must be an object")
        seed = d.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise BadMessage("'seed' must be an integer or null")
        return cls(temperature=_float(d, "temperature", default=0.0), top_p=_float(d, "top_p", default=1.0), seed=seed)


@dataclass(frozen=True, kw_only=True)
class Submit:
    """head → engine: decode `tokens`, then sample up to `max_new` tokens.

    `replay` are the tokens a previous engine already sent to the client for this request
    (after an engine restart): the engine brings them into the KV cache and continues.
    """

    T: ClassVar[str] = "submit"
    id: str
    tokens: tuple[int, ...]
    max_new: int
    sampling: Sampling = field(default_factory=Sampling)
    replay: tuple[int, ...] = ()

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Submit":
        return cls(
            id=_str(d, "id", limit=64),
            tokens=_tokens(d, "tokens"),
            max_new=_int(d, "max_new", lo=1),
            sampling=Sampling.parse(d.get("sampling", {})),
            replay=_tokens(d, "replay"),
        )


@dataclass(frozen=True, kw_only=True)
class Cancel:
    """head → engine: the client went away; free the request's sequence."""

    T: ClassVar[str] = "cancel"
    id: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Cancel":
        return cls(id=_str(d, "id", limit=64))


@dataclass(frozen=True, kw_only=True)
class Stop:
    """head → engine: exit now (the head restarts or re-plans)."""

    T: ClassVar[str] = "stop"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Stop":
        return cls()


@dataclass(frozen=True, kw_only=True)
class Hello:
    """engine → head: the process runs (its pid)."""

    T: ClassVar[str] = "hello"
    pid: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Hello":
        return cls(pid=_int(d, "pid", lo=0))


@dataclass(frozen=True, kw_only=True)
class Progress:
    """engine → head: model load progress, 0..1 (tensors sent to the workers)."""

    T: ClassVar[str] = "progress"
    fraction: float

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Progress":
        return cls(fraction=min(max(_float(d, "fraction"), 0.0), 1.0))


@dataclass(frozen=True, kw_only=True)
class Ready:
    """engine → head: loaded, serving."""

    T: ClassVar[str] = "ready"
    n_ctx_seq: int
    max_batch: int
    load_s: float

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Ready":
        return cls(n_ctx_seq=_int(d, "n_ctx_seq", lo=1), max_batch=_int(d, "max_batch", lo=1), load_s=_float(d, "load_s"))


@dataclass(frozen=True, kw_only=True)
class Failed:
    """engine → head: the load failed (the process exits next)."""

    T: ClassVar[str] = "failed"
    error: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Failed":
        return cls(error=_str(d, "error", default="load failed", limit=1000))


@dataclass(frozen=True, kw_only=True)
class Tokens:
    """engine → head: one decode step's sampled tokens, as (request id, token) pairs."""

    T: ClassVar[str] = "tokens"
    items: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Tokens":
        items = d.get("items")
        if not isinstance(items, list):
            raise BadMessage("'items' must be a list")
        out = []
        for it in items:
            if (
                not isinstance(it, list)
                or len(it) != 2
                or not isinstance(it[0], str)
                or not isinstance(it[1], int)
                or isinstance(it[1], bool)
            ):
                raise BadMessage("'items' must hold [request id, token] pairs")
            out.append((it[0], it[1]))
        return cls(items=tuple(out))


@dataclass(frozen=True, kw_only=True)
class Done:
    """engine → head: a request finished: "stop" (end of generation), "length", "context"."""

    T: ClassVar[str] = "done"
    id: str
    reason: str = "stop"
    produced: int = 0

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Done":
        return cls(id=_str(d, "id", limit=64), reason=_str(d, "reason", default="stop", limit=32),
                   produced=_int(d, "produced", default=0, lo=0))


@dataclass(frozen=True, kw_only=True)
class Error:
    """engine → head: the engine rejected a request (it does not fit the context, ...)."""

    T: ClassVar[str] = "error"
    id: str
    error: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Error":
        return cls(id=_str(d, "id", limit=64), error=_str(d, "error", default="engine error", limit=1000))


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """engine → head, every ENGINE_HEARTBEAT_INTERVAL_S: progress counters (stall detection)."""

    T: ClassVar[str] = "hb"
    active: int
    queued: int
    steps: int  # decode steps
    tokens: int  # tokens sampled and sent
    prefilled: int = 0  # tokens brought in by prefills (prompts and resumed answers)
    decodes: int = 0  # llama_decode calls (prefill chunks and decode steps)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Heartbeat":
        keys = ("active", "queued", "steps", "tokens", "prefilled", "decodes")
        return cls(**{k: _int(d, k, default=0, lo=0) for k in keys})


ToEngine = Union[Submit, Cancel, Stop]
FromEngine = Union[Hello, Progress, Ready, Failed, Tokens, Done, Error, Heartbeat]
Message = Union[ToEngine, FromEngine]

TO_ENGINE: dict[str, type] = {c.T: c for c in (Submit, Cancel, Stop)}
FROM_ENGINE: dict[str, type] = {c.T: c for c in (Hello, Progress, Ready, Failed, Tokens, Done, Error, Heartbeat)}


def encode(msg: Message) -> bytes:
    body = asdict(msg)
    body["t"] = msg.T
    return json.dumps(body, separators=(",", ":")).encode()


def decode(raw: bytes, *, allowed: dict[str, type]) -> Any:
    """Parse one frame into one of `allowed`'s message types; `BadMessage` otherwise."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(d, dict):
        raise BadMessage("not a JSON object")
    cls = allowed.get(d.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise BadMessage(f"unknown message type {str(d.get('t'))[:32]!r}")
    return cls.parse(d)  # type: ignore[attr-defined]
