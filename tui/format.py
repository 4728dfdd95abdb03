"""Small pure formatters shared by the screens: sizes, ages, layer ranges, state colours.

Kept apart from the widgets so every screen shows the same value the same way, and so
nothing here depends on a clock: callers pass `now` (the snapshot's, from the app's
injected clock), which keeps the snapshot tests deterministic. They take the API's
models (appliance.common.status), whose types are already checked, and the colour
tables are keyed by the appliance's enums (appliance.common.kinds), one entry per
member (tests/test_tui_format.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import TypeVar

from rich.text import Text

from appliance.common.kinds import EngineState, EventKind, HealthState, NodeState
from appliance.common.status import NodeStatus

E = TypeVar("E", bound=Enum)

#: Node states (`NodeStatus.state`) and their colours; every member has one (tests/test_tui_format.py).
NODE_STATE_STYLE: dict[NodeState, str] = {
    NodeState.ALIVE: "bold green",
    NodeState.JOINING: "cyan",
    NodeState.SUSPECT: "bold yellow",
    NodeState.DEAD: "bold red",
    NodeState.LEFT: "dim",
    NodeState.DRAINING: "bold magenta",
    NodeState.CORDONED: "blue",
    NodeState.REFUSED: "red",
}

#: Engine states (`EngineStatus.state`).
ENGINE_STATE_STYLE: dict[EngineState, str] = {
    EngineState.SERVING: "bold green",
    EngineState.LOADING: "bold yellow",
    EngineState.STARTING: "yellow",
    EngineState.STOPPING: "yellow",
    EngineState.STOPPED: "dim",
    EngineState.FAILED: "bold red",
}

#: Cluster health (`Health.status`).
HEALTH_STYLE: dict[HealthState, str] = {
    HealthState.OK: "bold green",
    HealthState.STARTING: "bold cyan",
    HealthState.RECOVERING: "bold yellow",
    HealthState.DEGRADED: "bold red",
}

#: Event kinds, by how an operator should read them: green a node or the engine coming
#: (back) into service, cyan the head's routine work, magenta the operator's actions,
#: yellow worth a look, red something lost. Follows `EventKind.severity`: an error is
#: always red, an info never is (tests/test_tui_format.py).
EVENT_KIND_STYLE: dict[EventKind, str] = {
    # membership
    EventKind.JOIN: "green",
    EventKind.REJOIN: "green",
    EventKind.REANNOUNCE: "cyan",
    EventKind.ALIVE: "green",
    EventKind.SUSPECT: "bold yellow",
    EventKind.RECOVERED: "green",
    EventKind.DEAD: "bold red",
    EventKind.LEFT: "yellow",
    EventKind.REFUSED: "red",
    EventKind.VERSION_SKEW: "yellow",
    EventKind.RPC_DOWN: "red",
    EventKind.RPC_UP: "green",
    EventKind.STALL: "bold yellow",
    # control plane
    EventKind.BAD_FRAME: "red",
    # the head's stabilization loop and the operator
    EventKind.HEAD_START: "bold cyan",
    EventKind.REPLAN: "cyan",
    EventKind.WAITING: "dim",
    EventKind.DEGRADED: "bold red",
    EventKind.DRAIN: "magenta",
    EventKind.UNCORDON: "magenta",
    EventKind.RELOAD: "magenta",
    # the engine process
    EventKind.ENGINE_START: "cyan",
    EventKind.ENGINE_STOP: "yellow",
    EventKind.ENGINE_READY: "green",
    EventKind.ENGINE_CRASH: "bold red",
    EventKind.ENGINE_FAILED: "bold red",
}

#: Colours of the nodes in the layer map (and their names in the table), in order.
NODE_PALETTE: tuple[str, ...] = (
    "#3b8eea",
    "#e5a50a",
    "#26a269",
    "#c061cb",
    "#e66100",
    "#2ec27e",
    "#f66151",
    "#99c1f1",
    "#f8e45c",
    "#dc8add",
)


def node_colours(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per node: by sorted name, so it does not depend on the API's order."""
    return {name: NODE_PALETTE[i % len(NODE_PALETTE)] for i, name in enumerate(sorted(set(names)))}


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.5K'; compact binary units, for tables (None -> '—')."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if abs(value) < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return f"{value:.0f}T"  # pragma: no cover


def fmt_age(seconds: float | None) -> str:
    """Seconds -> '0.2s', '12s', '3m', '5h', '2d' (None -> '—')."""
    if seconds is None:
        return "—"
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.0f}h"
    return f"{s / 86400:.0f}d"


def fmt_layers(layers: tuple[int, int] | None) -> str:
    """(start, end_exclusive) -> '0-14' (inclusive, as the head's events write it); None -> '—'."""
    if layers is None:
        return "—"
    start, end = layers
    return f"{start}-{end - 1}" if end - start > 1 else f"{start}"


def styled(value: E, style_map: Mapping[E, str], *, default: str = "") -> Text:
    """An enum member's value as a Text in its colour from `style_map`."""
    return Text(str(value.value), style=style_map.get(value, default))


def node_state(node: NodeStatus) -> Text:
    return styled(node.state, NODE_STATE_STYLE)


def memory_used_free(node: NodeStatus) -> str:
    """'used/free' of the node's memory; '—' while it has reported none."""
    mem = node.memory
    if not mem.total_bytes:
        return "—"
    return f"{fmt_bytes(mem.total_bytes - mem.free_bytes)}/{fmt_bytes(mem.free_bytes)}"


def devices_summary(node: NodeStatus) -> str:
    """'cpu', 'gpu+cpu', '2gpu+cpu' (device types, counted when more than one)."""
    if not node.devices:
        return "—"
    counts: dict[str, int] = {}
    for d in node.devices:
        kind = d.type or "?"
        counts[kind] = counts.get(kind, 0) + 1
    return "+".join(f"{n}{kind}" if n > 1 else kind for kind, n in counts.items())


def busy(node: NodeStatus) -> str:
    """The share of wall time the node's RPC server computed: an idle pipeline shows low."""
    b = node.load.rpc_busy
    return "—" if b is None else f"{b:.0%}"


def cpu_load(node: NodeStatus) -> str:
    cpu = node.load.cpu_percent
    return "—" if cpu is None else f"{cpu:.0f}%"
