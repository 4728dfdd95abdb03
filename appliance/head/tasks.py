"""Supervision of the head's long-running tasks: a task that dies is restarted or ends the head.

The head is one asyncio process running several loops (control-plane receive and
heartbeats, the reconcile loop, the RPC prober, the engine's receive loop, the API
server). If one of them died silently the process would stay half alive: its API
answering while no heartbeat is read. So every loop runs under `TaskSupervisor`: an
unexpected exit (an exception, or a loop that returns) is logged with its traceback,
counted, and the loop restarted after a backoff; a loop that keeps dying (more than
TASK_RESTARTS_PER_WINDOW in TASK_RESTART_WINDOW_S), or one that must not be restarted
(the API server), raises `TaskFailed`: the head shuts down and exits non-zero, and its
service manager starts a fresh one. Never half alive.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from appliance.common import logs
from appliance.common.config import RecoveryTiming
from appliance.core.crashloop import CrashLoopGuard

log = logs.get("head.tasks")


class TaskFailed(Exception):
    """A supervised task died and could not be kept alive."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    factory: Callable[[], Awaitable[None]]
    restart: bool = True  # False: its end ends the head (e.g. the API server)


class TaskSupervisor:
    def __init__(self, *, timing: RecoveryTiming, on_restart: Callable[[str], None] = lambda name: None) -> None:
        self.t = timing
        self.on_restart = on_restart

    async def run(self, specs: list[TaskSpec], *, stop: asyncio.Event) -> None:
        """Run every task until `stop` is set (then cancel them and return), or raise `TaskFailed`."""
        guards = {
            s.name: CrashLoopGuard(
                window_s=self.t.TASK_RESTART_WINDOW_S,
                max_starts=self.t.TASK_RESTARTS_PER_WINDOW,
                backoff_min_s=self.t.TASK_BACKOFF_MIN_S,
                backoff_max_s=self.t.TASK_BACKOFF_MAX_S,
            )
            for s in specs
        }
        by_task: dict[asyncio.Task[None], TaskSpec] = {}
        pending_restart: dict[str, float] = {}  # task name -> when it may start again (monotonic)

        def start(spec: TaskSpec) -> None:
            by_task[asyncio.ensure_future(spec.factory())] = spec

        for s in specs:
            start(s)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                now = time.monotonic()
                for name, at in list(pending_restart.items()):
                    if at <= now:
                        del pending_restart[name]
                        start(next(s for s in specs if s.name == name))
                timeout = max(0.0, min(pending_restart.values()) - now) if pending_restart else None
                done, _ = await asyncio.wait([*by_task, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    return
                for task in done:
                    spec = by_task.pop(task)  # type: ignore[arg-type]
                    exc = None if task.cancelled() else task.exception()
                    why = repr(exc) if exc is not None else ("cancelled" if task.cancelled() else "returned")
                    log.error("task_died", exc=exc if exc is not None else False, task=spec.name, reason=why)
                    guard = guards[spec.name]
                    now = time.monotonic()
                    guard.record_failure(now)
                    if not spec.restart or not guard.allow(now, ignore_backoff=True):
                        raise TaskFailed(f"task {spec.name} died ({why}) and cannot be kept alive") from exc
                    guard.record_start(now)
                    self.on_restart(spec.name)
                    pending_restart[spec.name] = guard.not_before
        finally:
            stopper.cancel()
            for task in by_task:
                task.cancel()
            await asyncio.gather(*by_task, stopper, return_exceptions=True)
