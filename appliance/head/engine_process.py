"""The engine process as the head sees it: start it with a plan, watch it, stop it.

Desired vs actual for one child: the reconciler decides when an engine should start or
stop; this module does it and keeps the actual state (`EngineState`) honest. Each start
is a new generation: the child connects to the head's ipc:// ROUTER with identity
`engine-N`, and messages from an older generation are ignored. A child that exits
unexpectedly (ggml aborts it when a worker vanishes) is recorded as a crash with a
one-line reason from its output, and its restarts go through a crash-loop guard.
Stopping is SIGTERM, then SIGKILL after ENGINE_STOP_GRACE_S (at once for an engine
stalled inside ggml, which cannot act on SIGTERM).

Request traffic is not handled here: messages about requests (tokens, done, error) and
the engine's loss or readiness go to a `RequestSink` (appliance.head.requests), which
keeps every request alive across engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

import zmq
import zmq.asyncio

from appliance.common import engine_protocol as ep
from appliance.common import logs
from appliance.common.config import EngineTiming
from appliance.common.dataplane import TunnelSpec
from appliance.common.kinds import EngineState, EventKind
from appliance.common.process import aterminate
from appliance.core.crashloop import CrashLoopGuard
from appliance.core.planner import Plan
from appliance.core.reconciler import EngineView

log = logs.get("head.engine")


class RequestSink(Protocol):
    """Where the engine's request-level news goes (implemented by `RequestRouter`)."""

    def on_engine_message(self, gen: int, msg: ep.Tokens | ep.Done | ep.Error) -> None: ...

    def on_engine_lost(self, gen: int, reason: str) -> None: ...


class EngineProcess:
    def __init__(
        self,
        *,
        model_path: str,
        run_dir: Path,
        n_ctx_seq: int,
        max_batch: int,
        threads: int,
        timing: EngineTiming,
        on_event: Callable[[EventKind, str], None],
        draft_max: int = 0,
        draft_min: int = 0,
        draft_model_path: str = "",
        on_drafts: Callable[[int, int], None] = lambda drafted, accepted: None,
    ) -> None:
        self.model_path = model_path
        self.draft_max = draft_max
        self.draft_min = draft_min
        self.draft_model_path = draft_model_path
        self.on_drafts = on_drafts  # (drafted, accepted) tokens newly counted by the engine
        self.run_dir = run_dir
        self.n_ctx_seq = n_ctx_seq
        self.max_batch = max_batch
        self.threads = threads
        self.t = timing
        self.on_event = on_event
        self.sink: RequestSink | None = None
        self.state = EngineState.STOPPED
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
        self.crashes = 0  # engines lost unexpectedly (planned stops do not count)
        self.lost_at: float | None = None  # when the last serving engine went away
        self.last_recovery_s: float | None = None
        self.ready: ep.Ready | None = None
        self.pid: int | None = None
        self.stats = ep.Heartbeat(active=0, queued=0, steps=0, tokens=0)
        self.output_tail: deque[str] = deque(maxlen=30)
        self.serving = asyncio.Event()
        self.guard = CrashLoopGuard(
            window_s=timing.ENGINE_RESTART_WINDOW_S,
            max_starts=timing.ENGINE_RESTARTS_PER_WINDOW,
            backoff_min_s=timing.ENGINE_BACKOFF_MIN_S,
            backoff_max_s=timing.ENGINE_BACKOFF_MAX_S,
        )
        self.endpoint = f"ipc://{run_dir / 'engine.sock'}"
        self._zctx = zmq.asyncio.Context.instance()
        self.sock = self._zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(self.endpoint)
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ views
    @property
    def n_ctx_served(self) -> int:
        """The context per request of the engine serving now (or the configured one)."""
        return self.ready.n_ctx_seq if self.ready is not None else self.n_ctx_seq

    def view(self, *, busy: bool) -> EngineView:
        return EngineView(
            state=self.state,
            plan=self.plan,
            considered=self.considered,
            started_at=self.started_at,
            last_progress_at=self.last_progress_at,
            busy=busy,
        )

    def restart_allowed(self, now: float, *, new_layout: bool = False) -> bool:
        """May an engine start now? A new layout (the cluster changed) skips the crash-loop
        backoff, which exists for an engine that keeps failing on the same layout; the cap on
        starts per ENGINE_RESTART_WINDOW_S still holds."""
        return self.guard.allow(now, ignore_backoff=new_layout)

    def stalled(self, now: float, *, busy: bool, after_s: float) -> bool:
        """Serving with requests waiting, yet no token for `after_s`: blocked on a worker that
        neither answers nor resets the connection (hung, unplugged, cut off)."""
        return self.state == EngineState.SERVING and busy and now - self.last_progress_at > after_s

    # ------------------------------------------------------------ lifecycle
    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, plan: Plan, considered: frozenset[str], *, tunnels: TunnelSpec | None = None) -> None:
        """Start engine N+1 on `plan`; `tunnels` names the endpoints it reaches over TLS."""
        now = time.monotonic()
        if self.state == EngineState.FAILED:
            # Only restarts after a failure count towards the crash-loop cap; planned starts
            # (first load, re-plan, operator reload) are bounded by membership's settle times.
            self.guard.record_start(now)
        self.gen += 1
        self.identity = f"engine-{self.gen}".encode()
        self.plan, self.considered = plan, considered
        self.state = EngineState.STARTING
        self.progress = 0.0
        self.started_at = self.last_progress_at = now
        self.ready = None
        self.pid = None
        self.stats = ep.Heartbeat(active=0, queued=0, steps=0, tokens=0)  # the new engine's counters start at 0
        self.output_tail.clear()
        plan_file = self.run_dir / f"plan-{self.gen}.json"
        plan_file.write_text(json.dumps(plan.to_dict()))
        tunnel_file = self.run_dir / f"tunnels-{self.gen}.json"
        if tunnels is not None:
            tunnel_file.write_text(tunnels.to_json())
        for old in [*self.run_dir.glob("plan-*.json"), *self.run_dir.glob("tunnels-*.json")]:
            if old not in (plan_file, tunnel_file):
                old.unlink(missing_ok=True)
        args = [
            sys.executable, "-m", "appliance.engine",
            "--connect", self.endpoint,
            "--identity", self.identity.decode(),
            "--model", self.model_path,
            "--plan", str(plan_file),
            "--n-ctx", str(self.n_ctx_seq),
            "--max-batch", str(self.max_batch),
            "--threads", str(self.threads),
            "--heartbeat-interval", str(self.t.ENGINE_HEARTBEAT_INTERVAL_S),
            "--draft-max", str(self.draft_max),
            "--draft-min", str(self.draft_min),
            *(["--tunnels", str(tunnel_file)] if tunnels is not None else []),
        ]  # fmt: skip
        if self.draft_model_path:
            args += ["--draft-model", self.draft_model_path]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # ggml's abort handler otherwise runs gdb for a backtrace first: half a second more
        # before the head learns that a worker vanished under the engine.
        env.setdefault("GGML_NO_BACKTRACE", "1")
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        layout = ", ".join(f"{a.node}[{a.start}-{a.end - 1}]" for a in plan.assignments if a.n_layers)
        self.on_event(EventKind.ENGINE_START, f"engine #{self.gen} starting (pid {self.proc.pid}): {layout}")
        self._spawn_task(self._pump_output(self.proc), name=f"engine-{self.gen}-output")
        self._spawn_task(self._watch_exit(self.gen, self.proc), name=f"engine-{self.gen}-exit")

    async def stop(self, reason: str, *, stalled: bool = False) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            self._lost(reason, expected=True)
            return
        # A stalled engine is blocked inside ggml and cannot act on SIGTERM: kill it at once.
        grace_s = self.t.ENGINE_STALLED_STOP_GRACE_S if stalled else self.t.ENGINE_STOP_GRACE_S
        self.state = EngineState.STOPPING
        self.serving.clear()
        self.on_event(EventKind.ENGINE_STOP, f"stopping engine #{self.gen}: {reason}")
        try:
            await self.sock.send_multipart([self.identity, ep.encode(ep.Stop())], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        await aterminate(proc, grace_s=grace_s)
        # _watch_exit records the exit and tells the requests.

    async def close(self) -> None:
        """The head shuts down: stop the engine (a planned stop, not a crash) and the socket."""
        if self.sink is not None:
            self.sink.on_engine_lost(self.gen, "shutdown")
        if self.proc is not None and self.proc.returncode is None:
            self.state = EngineState.STOPPING
            await aterminate(self.proc, grace_s=self.t.ENGINE_STOP_GRACE_S)
        for t in list(self._tasks):
            t.cancel()
        self.sock.close(linger=0)

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.output_tail.append(line)
                log.debug("engine_output", pid=proc.pid, line=line[:500])

    def _exit_reason(self, code: int) -> str:
        tail = next(
            (ln for ln in reversed(self.output_tail) if "error" in ln.lower() or "abort" in ln.lower()),
            self.output_tail[-1] if self.output_tail else "",
        )
        if code == -6 and not tail:
            tail = "aborted by ggml (an RPC worker vanished or answered badly)"
        tail = re.sub(r"/\S*/([\w.-]+\.(?:c|cc|cpp|h)):", r"\1:", tail)  # build paths say nothing to an operator
        return f"exit code {code}" + (f": {tail[:300]}" if tail else "")

    async def _watch_exit(self, gen: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if gen != self.gen:
            return
        self.last_exit = code
        expected = self.state == EngineState.STOPPING
        if not expected:
            detail = self._exit_reason(code)
            if not self.last_error:
                self.last_error = detail
            self.crashes += 1
            self.guard.record_failure(time.monotonic())
            failed_load = self.state in (EngineState.STARTING, EngineState.LOADING)
            self.on_event(
                EventKind.ENGINE_FAILED if failed_load else EventKind.ENGINE_CRASH,
                f"engine #{gen} exited unexpectedly ({detail})",
            )
        self._lost(f"engine #{gen} exited ({code})", expected=expected)

    def _lost(self, reason: str, *, expected: bool) -> None:
        if self.state == EngineState.SERVING or (self.state == EngineState.STOPPING and self.ready_at >= self.started_at):
            self.lost_at = time.monotonic()
        self.state = EngineState.STOPPED if expected else EngineState.FAILED
        self.serving.clear()
        self.proc = None
        if self.sink is not None:
            self.sink.on_engine_lost(self.gen, reason)

    # ------------------------------------------------------------ messages
    async def send(self, msg: ep.ToEngine) -> None:
        await self.sock.send_multipart([self.identity, ep.encode(msg)])

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
                self._handle(ep.decode(raw, allowed=ep.FROM_ENGINE))
            except ep.BadMessage as exc:
                log.warning("engine_message_dropped", error=str(exc)[:200])

    def _handle(self, msg: ep.FromEngine) -> None:
        now = time.monotonic()
        if isinstance(msg, (ep.Tokens, ep.Done, ep.Error)):
            if not isinstance(msg, ep.Error):
                self.last_progress_at = now
            if self.sink is not None:
                self.sink.on_engine_message(self.gen, msg)
        elif isinstance(msg, ep.Heartbeat):
            old = self.stats  # the same engine's previous counters (reset when an engine starts)
            if msg.drafted > old.drafted:
                self.on_drafts(msg.drafted - old.drafted, max(msg.accepted - old.accepted, 0))
            self.stats = msg
            # Idle, or a llama_decode pass finished since the last heartbeat (a long prefill
            # sends no token for minutes but is not stalled).
            if (not msg.active and not msg.queued) or msg.decodes > old.decodes:
                self.last_progress_at = now
        elif self.state == EngineState.STOPPING:
            return  # a stopping engine's load progress or readiness no longer matters
        elif isinstance(msg, ep.Progress):
            if self.state == EngineState.STARTING:
                self.state = EngineState.LOADING
            self.progress = msg.fraction
            self.last_progress_at = now
        elif isinstance(msg, ep.Hello):
            self.pid = msg.pid
        elif isinstance(msg, ep.Ready):
            self.state = EngineState.SERVING
            self.progress = 1.0
            self.ready_at = now
            self.ready = msg
            self.last_error = ""
            self.guard.record_healthy()
            if self.lost_at is not None:
                self.last_recovery_s = now - self.lost_at
                self.lost_at = None
            self.on_event(EventKind.ENGINE_READY, f"engine #{self.gen} serving (loaded in {msg.load_s}s)")
            self.serving.set()
        elif isinstance(msg, ep.Failed):
            self.last_error = msg.error[:500]
