"""The head's side of the engine process: start, watch, stop, and route requests to it.

Requests survive the engine: each in-flight request keeps its prompt tokens and the
tokens already streamed. When the engine is lost (it crashed, was killed because a
worker died or hung, or was restarted for a re-plan), every request waits for the
next engine and is re-submitted with `replay` = tokens already sent; the engine
re-decodes them exactly as the first time and goes on, so the client sees one
uninterrupted stream (identical to a fault-free run with greedy decoding).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import zmq
import zmq.asyncio

from . import logs
from .config import Timing
from .engine import EngineMsg
from .planner import Plan
from .procutil import CrashLoopGuard, aterminate
from .reconciler import EngineState, EngineView

log = logs.get("head.engine")


class EngineUnavailable(Exception):
    """No engine came back within the recovery timeout (or the cluster is degraded)."""


class EngineRequestError(Exception):
    """The engine rejected the request itself (e.g. it does not fit the context)."""


@dataclass
class GenParams:
    """One generation: what to run, and (filled in by `generate`) how it ended."""

    prompt: list[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    finish_reason: str = ""  # "stop" | "length", set when the engine finishes it
    resumes: int = 0  # how many engine restarts it survived


@dataclass
class _Active:
    rid: str
    params: GenParams
    queue: asyncio.Queue[tuple[str, int, Any]] = field(default_factory=asyncio.Queue)
    sent: list[int] = field(default_factory=list)
    gen: int = 0  # engine generation the request is on (0: not submitted)
    resumes: int = 0
    finish_reason: str = ""


class EngineManager:
    def __init__(
        self,
        *,
        model_path: str,
        run_dir: Path,
        n_ctx_seq: int,
        max_batch: int,
        threads: int,
        timing: Timing,
        on_event: Callable[[str, str], None],
        on_tokens: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.model_path = model_path
        self.run_dir = run_dir
        self.n_ctx_seq = n_ctx_seq
        self.max_batch = max_batch
        self.threads = threads
        self.timing = timing
        self.on_event = on_event
        self.on_tokens = on_tokens
        self.state: EngineState = "stopped"
        self.plan: Plan | None = None
        self.considered: frozenset[str] = frozenset()
        self.gen = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.identity = b""
        self.progress = 0.0
        self.started_at = 0.0
        self.ready_at = 0.0
        self.last_progress_at = 0.0
        self.last_error = ""
        self.last_exit: int | None = None
        self.restarts = 0
        self.lost_at: float | None = None  # when the last serving engine went away
        self.last_recovery_s: float | None = None
        self.info: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.stderr_tail: deque[str] = deque(maxlen=30)
        self.requests: dict[str, _Active] = {}
        self.serving = asyncio.Event()
        self.guard = CrashLoopGuard(
            window_s=timing.ENGINE_RESTART_WINDOW_S,
            max_starts=timing.ENGINE_RESTARTS_PER_WINDOW,
            backoff_min_s=timing.ENGINE_BACKOFF_MIN_S,
            backoff_max_s=timing.ENGINE_BACKOFF_MAX_S,
        )
        self._ids = itertools.count(1)
        self.endpoint = f"ipc://{run_dir / 'engine.sock'}"
        self._zctx = zmq.asyncio.Context.instance()
        self.sock = self._zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(self.endpoint)
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------ lifecycle
    def view(self) -> EngineView:
        return EngineView(
            state=self.state,
            plan=self.plan,
            considered=self.considered,
            started_at=self.started_at,
            last_progress_at=self.last_progress_at,
            busy=bool(self.requests),
        )

    def restart_allowed(self, now: float, *, new_layout: bool = False) -> bool:
        """May an engine start now? A new layout (the cluster changed) skips the crash-loop
        backoff, which exists for an engine that keeps failing on the same layout; the cap on
        starts per ENGINE_RESTART_WINDOW_S still holds."""
        return self.guard.allow(now, ignore_backoff=new_layout)

    async def start(self, plan: Plan, considered: frozenset[str]) -> None:
        now = time.monotonic()
        if self.state == "failed":
            # Only restarts after a failure count towards the crash-loop cap; planned starts
            # (first load, re-plan, operator reload) are bounded by membership's settle times.
            self.guard.record_start(now)
        self.gen += 1
        self.identity = f"engine-{self.gen}".encode()
        self.plan, self.considered = plan, considered
        self.state = "starting"
        self.progress = 0.0
        self.started_at = self.last_progress_at = now
        self.info = {}
        self.stderr_tail.clear()
        plan_file = self.run_dir / f"plan-{self.gen}.json"
        plan_file.write_text(json.dumps(plan.to_dict()))
        for old in self.run_dir.glob("plan-*.json"):
            if old != plan_file:
                old.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "appliance.engine",
            "--connect",
            self.endpoint,
            "--identity",
            self.identity.decode(),
            "--model",
            self.model_path,
            "--plan",
            str(plan_file),
            "--n-ctx",
            str(self.n_ctx_seq),
            "--max-batch",
            str(self.max_batch),
            "--threads",
            str(self.threads),
        ]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # ggml's abort handler otherwise runs gdb for a backtrace first: half a second more
        # before the head learns that a worker vanished under the engine.
        env.setdefault("GGML_NO_BACKTRACE", "1")
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        layout = ", ".join(f"{a.node}[{a.start}-{a.end - 1}]" for a in plan.assignments if a.n_layers)
        self.on_event("engine_start", f"engine #{self.gen} starting (pid {self.proc.pid}): {layout}")
        gen, proc = self.gen, self.proc
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._pump_output(proc)))
        self._tasks.append(asyncio.create_task(self._watch_exit(gen, proc)))

    def stalled(self, now: float) -> bool:
        """Serving with requests waiting, yet no token for SUSPECT_AFTER_S: blocked on a worker
        that neither answers nor resets the connection (hung, unplugged, cut off)."""
        return self.state == "serving" and bool(self.requests) and now - self.last_progress_at > self.timing.SUSPECT_AFTER_S

    async def stop(self, reason: str) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            self._lost(reason, expected=True)
            return
        # A stalled engine is blocked inside ggml and cannot act on SIGTERM: kill it at once.
        grace_s = 0.05 if self.stalled(time.monotonic()) else self.timing.ENGINE_STOP_GRACE_S
        self.state = "stopping"
        self.serving.clear()
        self.on_event("engine_stop", f"stopping engine #{self.gen}: {reason}")
        try:
            await self.sock.send_multipart([self.identity, json.dumps({"t": EngineMsg.STOP}).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        await aterminate(proc, grace_s=grace_s)
        # _watch_exit records the exit and notifies requests.

    async def close(self) -> None:
        for r in list(self.requests.values()):
            r.queue.put_nowait(("lost", r.gen, "shutdown"))
        if self.proc is not None and self.proc.returncode is None:
            await aterminate(self.proc, grace_s=self.timing.ENGINE_STOP_GRACE_S)
        for t in self._tasks:
            t.cancel()
        self.sock.close(linger=0)

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                log.debug("engine_output", pid=proc.pid, line=line[:500])

    async def _watch_exit(self, gen: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if gen != self.gen:
            return
        self.last_exit = code
        expected = self.state == "stopping"
        if not expected:
            tail = next(
                (ln for ln in reversed(self.stderr_tail) if "error" in ln.lower() or "abort" in ln.lower()),
                self.stderr_tail[-1] if self.stderr_tail else "",
            )
            if code == -6 and not tail:
                tail = "aborted by ggml (an RPC worker vanished or answered badly)"
            tail = re.sub(r"/\S*/([\w.-]+\.(?:c|cc|cpp|h)):", r"\1:", tail)  # build paths say nothing to an operator
            detail = f"exit code {code}" + (f": {tail[:300]}" if tail else "")
            if not self.last_error:
                self.last_error = detail
            self.guard.record_failure(time.monotonic())
            kind = "engine_failed" if self.state in ("starting", "loading") else "engine_crash"
            self.on_event(kind, f"engine #{gen} exited unexpectedly ({detail})")
        self._lost(f"engine #{gen} exited ({code})", expected=expected)

    def _lost(self, reason: str, *, expected: bool) -> None:
        if self.state == "serving" or (self.state == "stopping" and self.ready_at >= self.started_at):
            self.lost_at = time.monotonic()
        self.state = "failed" if not expected else "stopped"
        self.serving.clear()
        self.proc = None
        for r in self.requests.values():
            if r.gen == self.gen:
                r.queue.put_nowait(("lost", r.gen, reason))

    # ------------------------------------------------------------ messages
    async def recv_loop(self) -> None:
        while True:
            try:
                frames = await self.sock.recv_multipart()
            except zmq.ZMQError:
                return
            if len(frames) != 2:
                continue
            ident, raw = frames
            if ident != self.identity:
                continue  # a stale engine from an earlier generation
            try:
                msg = json.loads(raw)
                self._handle(msg)
            except Exception as exc:  # noqa: BLE001 - never let one message stop the loop
                log.warning("engine_message_error", error=str(exc)[:200])

    def _handle(self, msg: dict[str, Any]) -> None:
        t = msg.get("t")
        now = time.monotonic()
        if t == EngineMsg.TOKENS:
            self.last_progress_at = now
            by_req: dict[str, list[int]] = {}
            for rid, tok in msg["items"]:
                by_req.setdefault(rid, []).append(int(tok))
            for rid, toks in by_req.items():
                r = self.requests.get(rid)
                if r is not None and r.gen == self.gen:
                    r.queue.put_nowait(("tokens", self.gen, toks))
            self.on_tokens(len(msg["items"]))
        elif t == EngineMsg.DONE:
            self.last_progress_at = now
            r = self.requests.get(str(msg.get("id")))
            if r is not None and r.gen == self.gen:
                r.queue.put_nowait(("done", self.gen, msg.get("reason", "stop")))
        elif t == EngineMsg.ERROR:
            r = self.requests.get(str(msg.get("id")))
            if r is not None and r.gen == self.gen:
                r.queue.put_nowait(("error", self.gen, msg.get("error", "engine error")))
        elif t == EngineMsg.HEARTBEAT:
            self.stats = {k: msg.get(k) for k in ("active", "queued", "steps", "tokens")}
            if not msg.get("active") and not msg.get("queued"):
                self.last_progress_at = now
        elif self.state == "stopping":
            return  # a stopping engine's load progress or readiness no longer matters
        elif t == EngineMsg.PROGRESS:
            if self.state == "starting":
                self.state = "loading"
            self.progress = float(msg.get("fraction", 0.0))
            self.last_progress_at = now
        elif t == EngineMsg.HELLO:
            self.info["pid"] = msg.get("pid")
        elif t == EngineMsg.READY:
            self.state = "serving"
            self.progress = 1.0
            self.ready_at = now
            self.last_error = ""
            self.info.update({k: msg.get(k) for k in ("n_ctx_seq", "max_batch", "load_s")})
            self.guard.record_healthy()
            if self.lost_at is not None:
                self.last_recovery_s = now - self.lost_at
                self.lost_at = None
            self.on_event("engine_ready", f"engine #{self.gen} serving (loaded in {msg.get('load_s')}s)")
            self.serving.set()
            for r in self.requests.values():
                if r.gen != self.gen:
                    r.queue.put_nowait(("ready", self.gen, None))
        elif t == EngineMsg.FAILED:
            self.last_error = str(msg.get("error", "load failed"))[:500]

    # ------------------------------------------------------------ requests
    async def _send(self, msg: dict[str, Any]) -> None:
        await self.sock.send_multipart([self.identity, json.dumps(msg, separators=(",", ":")).encode()])

    async def generate(self, params: GenParams, *, degraded: Callable[[], str]) -> AsyncIterator[int]:
        """Yields sampled token ids; survives engine restarts. Sets `finish_reason`."""
        rid = f"r{next(self._ids)}"
        req = _Active(rid=rid, params=params)
        self.requests[rid] = req
        try:
            while True:
                if self.state != "serving":
                    await self._wait_serving(degraded)
                req.gen = self.gen
                remaining = params.max_new - len(req.sent)
                if remaining <= 0:
                    req.finish_reason = params.finish_reason = "length"
                    return
                await self._send(
                    {
                        "t": EngineMsg.SUBMIT,
                        "id": rid,
                        "tokens": params.prompt,
                        "replay": req.sent,
                        "max_new": remaining,
                        "temperature": params.temperature,
                        "top_p": params.top_p,
                        "seed": params.seed,
                    }
                )
                while True:
                    kind, gen, payload = await req.queue.get()
                    if gen != req.gen:
                        continue
                    if kind == "tokens":
                        for tok in payload:
                            req.sent.append(tok)
                            yield tok
                    elif kind == "done":
                        req.finish_reason = "length" if payload in ("length", "context") else "stop"
                        params.finish_reason = req.finish_reason
                        return
                    elif kind == "error":
                        raise EngineRequestError(str(payload))
                    elif kind == "lost":
                        req.resumes += 1
                        params.resumes = req.resumes
                        log.info("request_interrupted", rid=rid, sent=len(req.sent), reason=payload)
                        break
        finally:
            self.requests.pop(rid, None)
            if not req.finish_reason and req.gen == self.gen and self.state == "serving":
                try:
                    await self._send({"t": EngineMsg.CANCEL, "id": rid})
                except zmq.ZMQError:
                    pass

    async def _wait_serving(self, degraded: Callable[[], str]) -> None:
        deadline = time.monotonic() + self.timing.REQUEST_RECOVERY_TIMEOUT_S
        while self.state != "serving":
            left = deadline - time.monotonic()
            if left <= 0:
                why = degraded() or f"engine is {self.state}"
                raise EngineUnavailable(f"no engine within {self.timing.REQUEST_RECOVERY_TIMEOUT_S:.0f}s: {why}")
            try:
                await asyncio.wait_for(self.serving.wait(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "generation": self.gen,
            "pid": self.proc.pid if self.proc else None,
            "progress": round(self.progress, 3),
            "plan_nodes": [a.node for a in self.plan.assignments if a.n_layers] if self.plan else [],
            "n_ctx_seq": self.info.get("n_ctx_seq", self.n_ctx_seq),
            "max_batch": self.info.get("max_batch", self.max_batch),
            "load_s": self.info.get("load_s"),
            "restarts": max(self.gen - 1, 0),
            "last_error": self.last_error,
            "last_exit": self.last_exit,
            "last_recovery_s": round(self.last_recovery_s, 3) if self.last_recovery_s is not None else None,
            "requests_in_flight": len(self.requests),
            "stats": self.stats,
        }
