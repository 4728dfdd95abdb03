"""A crash-loop guard: may a child process start again now? Pure logic, times passed in.

The head's engine supervisor and the worker's RPC-server supervisor both restart a
child that died; a child that dies at once on every start must not be restarted in a
tight loop. `allow(now)` is True when a start may happen now; `record_start(now)` notes
one; `record_failure(now)` backs off exponentially; `record_healthy()` resets the
backoff once the child has run well.
"""

from __future__ import annotations


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

    def record_start(self, now: float) -> None:
        self.starts.append(now)

    def record_failure(self, now: float) -> None:
        self.failures += 1
        delay = min(self.backoff_min_s * (2 ** (self.failures - 1)), self.backoff_max_s)
        self.not_before = now + delay

    def record_healthy(self) -> None:
        self.failures = 0
        self.not_before = 0.0
