"""Child-process helpers shared by the head, the worker and `anyway up`.

Children die with their parent (PR_SET_PDEATHSIG), so an agent killed with SIGKILL
does not leave an orphaned RPC server holding its port and memory; stopping is
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # parent already gone before prctl took effect
        os.kill(os.getpid(), sig)


def python_module_cmd(module: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], *, grace_s: float) -> int | None:
    """SIGTERM, wait `grace_s`, then SIGKILL. Returns the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=5)
    except ProcessLookupError:
        return proc.poll()


async def aterminate(proc: asyncio.subprocess.Process, *, grace_s: float) -> int | None:
    """Async SIGTERM, then SIGKILL after `grace_s`, without blocking the event loop."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        # A stopped process cannot act on SIGTERM; let it see it.
        proc.send_signal(signal.SIGCONT)
    except ProcessLookupError:
        pass
    try:
        return await asyncio.wait_for(proc.wait(), timeout=grace_s)
    except asyncio.TimeoutError:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        return await proc.wait()


class CrashLoopGuard:
    """Allows a restart unless too many happened recently; backs off exponentially.

    `allow(now)` is True when a start may happen now; `record_start(now)` notes one;
    `record_healthy()` resets the backoff once a child has run well.
    """

    def __init__(self, *, window_s: float, max_starts: int, backoff_min_s: float, backoff_max_s: float) -> None:
        self.window_s = window_s
        self.max_starts = max_starts
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.starts: list[float] = []
        self.failures = 0
        self.not_before = 0.0

    def allow(self, now: float, *, ignore_backoff: bool = False) -> bool:
        self.starts = [t for t in self.starts if now - t < self.window_s]
        return (ignore_backoff or now >= self.not_before) and len(self.starts) < self.max_starts

    def next_allowed(self, now: float) -> float:
        self.starts = [t for t in self.starts if now - t < self.window_s]
        t = self.not_before
        if len(self.starts) >= self.max_starts:
            t = max(t, self.starts[0] + self.window_s)
        return max(t, now)

    def record_start(self, now: float) -> None:
        self.starts.append(now)

    def record_failure(self, now: float) -> None:
        self.failures += 1
        delay = min(self.backoff_min_s * (2 ** (self.failures - 1)), self.backoff_max_s)
        self.not_before = now + delay

    def record_healthy(self) -> None:
        self.failures = 0
        self.not_before = 0.0


def monotonic() -> float:
    return time.monotonic()
