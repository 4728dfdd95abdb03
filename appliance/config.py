"""Timing constants and tunables, with units in their names; every one is configurable.

Expiries are derived from the heartbeat interval, so one setting (`--heartbeat-interval`)
scales the whole failure detector. Defaults suit an office LAN; tests shrink them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_CONTROL_PORT = 5555
DEFAULT_API_PORT = 8080
DEFAULT_RPC_PORT = 50052
DEFAULT_N_CTX = 2048
DEFAULT_MAX_BATCH = 4


def cache_dir() -> Path:
    return Path(os.environ.get("ANYWAY_CACHE_DIR") or Path.home() / ".cache" / "anyway")


@dataclass(frozen=True)
class Timing:
    HEARTBEAT_INTERVAL_S: float = 0.5
    SUSPECT_AFTER_MISSED: int = 4  # heartbeats missed before a node is suspect
    DEAD_AFTER_MISSED: int = 10  # heartbeats missed before a node is dead
    JOIN_SETTLE_S: float = 1.0  # a (re)joining node must stay alive this long to be planned
    FLAP_WINDOW_S: float = 60.0  # deaths within this window count as flapping
    FLAP_SETTLE_MAX_S: float = 30.0  # settle time doubles per recent flap, up to this
    RECONNECT_BACKOFF_MIN_S: float = 0.25
    RECONNECT_BACKOFF_MAX_S: float = 8.0
    ENGINE_LOAD_TIMEOUT_S: float = 300.0
    ENGINE_STALL_TIMEOUT_S: float = 60.0  # no decode progress while requests wait
    ENGINE_STOP_GRACE_S: float = 3.0  # SIGTERM, then SIGKILL after this
    ENGINE_RESTART_WINDOW_S: float = 60.0
    ENGINE_RESTARTS_PER_WINDOW: int = 5
    ENGINE_BACKOFF_MIN_S: float = 0.5
    ENGINE_BACKOFF_MAX_S: float = 30.0
    RECONCILE_INTERVAL_S: float = 0.2
    REQUEST_RECOVERY_TIMEOUT_S: float = 120.0  # how long a request waits for a healed engine
    RETRY_AFTER_S: int = 5  # Retry-After sent with 503 while degraded
    RPC_PROBE_TIMEOUT_S: float = 0.5
    # After a control connection drops or the engine dies, probe the plan's RPC ports at
    # these delays (a killed box's processes do not all vanish in the same millisecond).
    RPC_PROBE_AFTER_S: tuple[float, ...] = (0.0, 0.05, 0.2, 0.5, 1.0)

    @property
    def SUSPECT_AFTER_S(self) -> float:  # noqa: N802 - constant-style name with unit
        return self.HEARTBEAT_INTERVAL_S * self.SUSPECT_AFTER_MISSED

    @property
    def DEAD_AFTER_S(self) -> float:  # noqa: N802
        return self.HEARTBEAT_INTERVAL_S * self.DEAD_AFTER_MISSED

    @property
    def HEAD_SILENCE_S(self) -> float:  # noqa: N802 - worker's view: head presumed gone
        return self.HEARTBEAT_INTERVAL_S * self.SUSPECT_AFTER_MISSED

    def with_interval(self, interval_s: float) -> "Timing":
        return replace(self, HEARTBEAT_INTERVAL_S=interval_s, JOIN_SETTLE_S=max(interval_s * 2, 0.2))


@dataclass(frozen=True)
class HeadConfig:
    model_path: str
    control_bind: str = f"tcp://0.0.0.0:{DEFAULT_CONTROL_PORT}"
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    n_ctx: int = DEFAULT_N_CTX  # per request (per sequence)
    max_batch: int = DEFAULT_MAX_BATCH
    head_memory_bytes: int = 0  # memory the head's own CPU lends to layers (0: none)
    strategy: str = "speed"
    max_tokens: int = 0  # per-request completion limit (0: up to the context)
    engine_threads: int = 0  # 0: llama.cpp's default
    keys_dir: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    run_dir: str = ""
    model_name: str = ""
    timing: Timing = field(default_factory=Timing)
