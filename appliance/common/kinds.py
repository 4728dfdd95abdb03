"""The appliance's vocabulary: every event kind and every state, as enums, in one place.

Why its own module: membership and the reconciler (core) produce these values, the
head's supervisor and control server emit them, the API serves them (common.status),
the CLI and the dashboard show them. With each set in one enum, a kind nobody emits or
a state nobody can show cannot exist (the dashboard's style tables are checked against
these enums in its tests). Pure enums, no I/O: core may import this.
"""

from __future__ import annotations

from enum import Enum


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventKind(str, Enum):
    # membership (appliance.core.membership)
    JOIN = "join"
    REJOIN = "rejoin"
    REANNOUNCE = "reannounce"
    ALIVE = "alive"
    SUSPECT = "suspect"
    RECOVERED = "recovered"
    DEAD = "dead"
    LEFT = "left"
    REFUSED = "refused"
    VERSION_SKEW = "version_skew"
    RPC_DOWN = "rpc_down"
    RPC_UP = "rpc_up"
    STALL = "stall"
    # control plane
    BAD_FRAME = "bad_frame"
    # the head's stabilization loop and the operator
    HEAD_START = "head_start"
    REPLAN = "replan"
    WAITING = "waiting"
    DEGRADED = "degraded"
    DRAIN = "drain"
    UNCORDON = "uncordon"
    RELOAD = "reload"
    # the engine process
    ENGINE_START = "engine_start"
    ENGINE_STOP = "engine_stop"
    ENGINE_READY = "engine_ready"
    ENGINE_CRASH = "engine_crash"
    ENGINE_FAILED = "engine_failed"

    @property
    def severity(self) -> Severity:
        return _SEVERITY.get(self, Severity.INFO)


_SEVERITY: dict[EventKind, Severity] = {
    EventKind.SUSPECT: Severity.WARNING,
    EventKind.STALL: Severity.WARNING,
    EventKind.VERSION_SKEW: Severity.WARNING,
    EventKind.RPC_DOWN: Severity.WARNING,
    EventKind.BAD_FRAME: Severity.WARNING,
    EventKind.REFUSED: Severity.WARNING,
    EventKind.DEAD: Severity.ERROR,
    EventKind.DEGRADED: Severity.ERROR,
    EventKind.ENGINE_CRASH: Severity.ERROR,
    EventKind.ENGINE_FAILED: Severity.ERROR,
}


class Liveness(str, Enum):
    """A node's liveness as the failure detector sees it (appliance.core.membership)."""

    JOINING = "joining"
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"
    REFUSED = "refused"


class NodeState(str, Enum):
    """A node as an operator sees it: its liveness, or the operator's overlay on it."""

    JOINING = "joining"
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"
    REFUSED = "refused"
    DRAINING = "draining"  # cordoned, while the loaded plan still uses it
    CORDONED = "cordoned"


class EngineState(str, Enum):
    """The engine process's lifecycle (appliance.head.engine_process)."""

    STOPPED = "stopped"
    STARTING = "starting"
    LOADING = "loading"
    SERVING = "serving"
    STOPPING = "stopping"
    FAILED = "failed"


RUNNING_ENGINE_STATES = frozenset({EngineState.STARTING, EngineState.LOADING, EngineState.SERVING})


class HealthState(str, Enum):
    """The cluster's health as `/health` and `/v1/cluster` report it."""

    OK = "ok"
    STARTING = "starting"
    RECOVERING = "recovering"
    DEGRADED = "degraded"
