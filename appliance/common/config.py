"""Every timing of the appliance, grouped by what it governs, with units in the names.

Why one module: an operator tunes the failure detector for their LAN with one setting
(`--heartbeat-interval`: suspect and dead times are multiples of it) and can override
any other constant by name (`--timing NAME=VALUE`, or a `timing:` mapping in YAML),
so nothing that waits, retries or expires is hard-coded anywhere else. Each process
receives only the groups it uses: membership and the worker's liveness take
`HeartbeatTiming`, the head's loops `RecoveryTiming`, the engine's supervisor
`EngineTiming`, the worker's RPC-server supervisor `WorkerTiming`.

Names are unique across the groups, so an override needs no group prefix.
Defaults suit an office LAN; tests shrink them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

DEFAULT_CONTROL_PORT = 5555
DEFAULT_API_PORT = 8080
DEFAULT_RPC_PORT = 50052
DEFAULT_N_CTX = 2048
DEFAULT_MAX_BATCH = 4
DEFAULT_DRAFT_MAX_TOKENS = 8
"""Speculative decoding: most drafted tokens checked per sequence and decode step (`--draft-max`)."""


def cache_dir() -> Path:
    """Where downloaded models, test models and tensor caches live (ANYWAY_CACHE_DIR)."""
    return Path(os.environ.get("ANYWAY_CACHE_DIR") or Path.home() / ".cache" / "anyway")


@dataclass(frozen=True, kw_only=True)
class HeartbeatTiming:
    """Control-plane liveness (both directions) and the failure detector built on it."""

    HEARTBEAT_INTERVAL_S: float = 0.5
    """Workers and the head each send a heartbeat this often."""
    SUSPECT_AFTER_MISSED: int = 4
    """Heartbeats missed before a node is suspect (and before a worker gives up on a silent head)."""
    DEAD_AFTER_MISSED: int = 10
    """Heartbeats missed before a node is dead and its layers move."""
    JOIN_SETTLE_S: float = 1.0
    """A (re)joining node must stay up this long before it is planned."""
    FLAP_WINDOW_S: float = 60.0
    """Deaths within this window count as flapping."""
    FLAP_SETTLE_MAX_S: float = 30.0
    """The settle time doubles per recent death, up to this."""
    RECONNECT_BACKOFF_MIN_S: float = 0.25
    """A worker's first wait before reconnecting to a silent head."""
    RECONNECT_BACKOFF_MAX_S: float = 8.0
    """A worker's longest wait between reconnects (also after a refusal)."""
    REFUSED_FORGET_S: float = 600.0
    """A refused node stays listed (with its reason) this long after its last attempt."""

    @property
    def SUSPECT_AFTER_S(self) -> float:  # noqa: N802 - constant-style name with unit
        return self.HEARTBEAT_INTERVAL_S * self.SUSPECT_AFTER_MISSED

    @property
    def DEAD_AFTER_S(self) -> float:  # noqa: N802
        return self.HEARTBEAT_INTERVAL_S * self.DEAD_AFTER_MISSED

    @property
    def HEAD_SILENCE_S(self) -> float:  # noqa: N802 - worker's view: head presumed gone
        return self.HEARTBEAT_INTERVAL_S * self.SUSPECT_AFTER_MISSED


@dataclass(frozen=True, kw_only=True)
class RecoveryTiming:
    """The head's stabilization loop, its RPC probes, and what clients see while it heals."""

    RECONCILE_INTERVAL_S: float = 0.2
    """How often desired and actual state are compared."""
    JOIN_WAIT_S: float = 10.0
    """Before the first plan, wait this long for nodes still joining (plan once, not twice)."""
    RPC_PROBE_TIMEOUT_S: float = 0.5
    """A TCP connect to a worker's RPC port that takes longer counts as no answer."""
    RPC_START_PROBE_GRACE_S: float = 3.0
    """Before an engine starts, a worker's RPC port that does not answer is tried again for this
    long before the node is suspected: ggml's RPC server serves one client at a time and queues
    one more, so right after the old engine left (its buffers still being freed on a big
    model) or while probes fill that queue, a healthy server can take a moment to accept."""
    RPC_PROBE_AFTER_S: tuple[float, ...] = (0.0, 0.05, 0.2, 0.5, 1.0)
    """After a control connection drops or the engine dies, probe the plan's RPC ports at these
    delays (a killed box's processes do not all vanish in the same millisecond)."""
    RPC_PROBE_TRIGGER_GAP_S: float = 0.04
    """Probe triggers (dropped control connections) closer together than this share one series of
    rounds: a peer that connects and disconnects in a loop cannot make the head probe without end."""
    REQUEST_RECOVERY_TIMEOUT_S: float = 120.0
    """How long a request waits for a healed engine before it gets 503."""
    RETRY_AFTER_S: int = 5
    """Retry-After sent with 503 while the cluster is degraded."""
    ENGINE_FAILURES_DEGRADED: int = 3
    """Engine failures in a row after which new requests get 503 instead of waiting."""
    REFUSED_EVENT_INTERVAL_S: float = 30.0
    """At most one `refused` event per remote endpoint per this (a refused node retries)."""
    BAD_FRAME_LOG_INTERVAL_S: float = 1.0
    """At most one log line per this for malformed control frames (they are all counted)."""
    CONTROL_MESSAGES_PER_S: float = 50.0
    """A node sends about two control messages a second; past this rate (sustained) the rest of
    its messages are dropped as a flood and counted as bad frames ..."""
    CONTROL_BURST_MESSAGES: int = 200
    """... after a burst of this many (a reconnect, a backlog after a pause)."""
    STAGING_SERVE_BYTES_PER_S: float = 128 * 1024 * 1024
    """Pre-staging's bulk traffic has its own budget, apart from the messages above: the head
    serves one node's FETCHes (each charged a whole CHUNK, however little it asks for) at most
    this fast, sustained; past it they are dropped as a flood and counted. Above a 1 Gbit/s
    line rate, so a worker's own staging rate (40 MiB/s by default) is what paces staging ..."""
    STAGING_BURST_MESSAGES: int = 32
    """... after a burst of this many FETCHes (a worker asks for a few pieces at once)."""
    STAGING_BUSY_CHUNK_INTERVAL_S: float = 0.25
    """While requests are in flight, the head answers one node's staging requests one at a time
    and this far apart (512 KiB each: about 2 MiB/s), so pre-staging yields the links and the
    CPU to the answers being written; idle, it answers at the worker's own pace. (Measured on a
    4 GB model over a shaped 1 Gbit/s LAN: staging at full pace made tokens 2.5x slower.)"""
    KEYS_RELOAD_INTERVAL_S: float = 0.5
    """How often the head checks its allow-list (DIR/nodes) for added and revoked node keys."""
    THROUGHPUT_WINDOW_S: float = 5.0
    """tokens/s in /v1/cluster is averaged over this window."""
    GROWTH_DEFER_MAX_S: float = 30.0
    """A node that could join the plan waits while the engine serves requests, at most this long
    (never while it loads or resumes requests): a re-plan interrupts every answer in flight."""
    TASK_RESTART_WINDOW_S: float = 60.0
    """A head task (control loop, reconcile loop, ...) that dies is restarted; restarts are counted
    over this window ..."""
    TASK_RESTARTS_PER_WINDOW: int = 5
    """... and past this many the head exits (its service manager starts a fresh one)."""
    TASK_BACKOFF_MIN_S: float = 0.1
    """First wait before restarting a dead head task; doubles per death."""
    TASK_BACKOFF_MAX_S: float = 5.0
    """Longest wait before restarting a dead head task."""


@dataclass(frozen=True, kw_only=True)
class EngineTiming:
    """The engine process's lifecycle as the head supervises it."""

    ENGINE_LOAD_TIMEOUT_S: float = 300.0
    """A model load that takes longer is abandoned (the engine is stopped and retried)."""
    ENGINE_STALL_TIMEOUT_S: float = 60.0
    """No decode progress for this long while requests wait: the engine is restarted."""
    ENGINE_STOP_GRACE_S: float = 3.0
    """SIGTERM, then SIGKILL after this."""
    ENGINE_STALLED_STOP_GRACE_S: float = 0.05
    """Grace for an engine stalled inside ggml (deaf to SIGTERM): killed almost at once."""
    ENGINE_RESTART_WINDOW_S: float = 60.0
    """Failed starts are counted over this window ..."""
    ENGINE_RESTARTS_PER_WINDOW: int = 5
    """... and no more than this many restarts are allowed in it."""
    ENGINE_BACKOFF_MIN_S: float = 0.5
    """First wait before retrying a layout whose engine failed; doubles per failure."""
    ENGINE_BACKOFF_MAX_S: float = 30.0
    """Longest wait before retrying a failing layout."""
    ENGINE_HEARTBEAT_INTERVAL_S: float = 0.5
    """The engine reports its progress counters to the head this often."""


@dataclass(frozen=True, kw_only=True)
class WorkerTiming:
    """The worker agent's supervision of its ggml RPC server child."""

    RPC_START_TIMEOUT_S: float = 30.0
    """A started RPC server must accept connections within this, or it counts as failed."""
    RPC_READY_POLL_S: float = 0.1
    """How often a starting RPC server's port is checked."""
    RPC_STOP_GRACE_S: float = 2.0
    """SIGTERM, then SIGKILL after this."""
    RPC_RESTART_WINDOW_S: float = 60.0
    """RPC server starts are counted over this window ..."""
    RPC_RESTARTS_PER_WINDOW: int = 10
    """... and no more than this many are allowed in it."""
    RPC_BACKOFF_MIN_S: float = 0.5
    """First wait before restarting a crashed RPC server; doubles per crash."""
    RPC_BACKOFF_MAX_S: float = 10.0
    """Longest wait before restarting a crashing RPC server."""
    STAGE_CHUNK_TIMEOUT_S: float = 10.0
    """A pre-staging request the head has not answered in this long is given up (and retried later)."""
    CACHE_CHECK_INTERVAL_S: float = 5.0
    """How often the tensor cache is brought back under its quota (the RPC server writes to it too)."""


GROUPS = ("heartbeat", "recovery", "engine", "worker")


@dataclass(frozen=True, kw_only=True)
class Timing:
    """All timing groups; `Timing().heartbeat.DEAD_AFTER_S` etc."""

    heartbeat: HeartbeatTiming = field(default_factory=HeartbeatTiming)
    recovery: RecoveryTiming = field(default_factory=RecoveryTiming)
    engine: EngineTiming = field(default_factory=EngineTiming)
    worker: WorkerTiming = field(default_factory=WorkerTiming)

    @staticmethod
    def constants() -> dict[str, tuple[str, Any]]:
        """Every overridable constant: NAME -> (group, default)."""
        out: dict[str, tuple[str, Any]] = {}
        defaults = Timing()
        for g in GROUPS:
            group = getattr(defaults, g)
            for f in fields(group):
                out[f.name] = (g, getattr(group, f.name))
        return out

    def with_interval(self, interval_s: float) -> "Timing":
        """A heartbeat interval, with the join settle time scaled to it."""
        hb = replace(self.heartbeat, HEARTBEAT_INTERVAL_S=interval_s, JOIN_SETTLE_S=max(interval_s * 2, 0.2))
        return replace(self, heartbeat=hb)

    def with_overrides(self, items: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> "Timing":
        """Override constants by name; `ValueError` with a one-line reason for a bad one."""
        known = self.constants()
        per_group: dict[str, dict[str, Any]] = {}
        for key, value in (items.items() if isinstance(items, Mapping) else items):
            name = str(key).strip().upper()
            if name not in known:
                raise ValueError(f"unknown constant {name!r}; known: {', '.join(sorted(known))}")
            group, default = known[name]
            per_group.setdefault(group, {})[name] = _parse_constant(name, value, default)
        out = self
        for group, over in per_group.items():
            out = replace(out, **{group: replace(getattr(out, group), **over)})
        return out


def _parse_constant(name: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, tuple):
            vals = value if isinstance(value, (list, tuple)) else str(value).split(",")
            parsed: Any = tuple(float(v) for v in vals)
            ok = all(v >= 0 for v in parsed)
        else:
            parsed = type(default)(value)
            ok = parsed > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}={value}: expected a positive {type(default).__name__}")
    return parsed
