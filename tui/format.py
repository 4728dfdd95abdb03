"""Small pure formatters shared by the screens: sizes, ages, layer ranges, state colours.

Kept apart from the widgets so every screen shows the same value the same way, and so
nothing here depends on a clock: callers pass `now` (the app's injected clock), which
keeps the snapshot tests deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text

#: Node states as the head reports them, and their colours.
NODE_STATE_STYLE: dict[str, str] = {
    "alive": "bold green",
    "joining": "cyan",
    "suspect": "bold yellow",
    "dead": "bold red",
    "left": "dim",
    "draining": "bold magenta",
    "cordoned": "blue",
    "refused": "red",
}

#: Engine states.
ENGINE_STATE_STYLE: dict[str, str] = {
    "serving": "bold green",
    "loading": "bold yellow",
    "starting": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
    "failed": "bold red",
}

#: Cluster health (`health.status`).
HEALTH_STYLE: dict[str, str] = {
    "ok": "bold green",
    "starting": "bold cyan",
    "recovering": "bold yellow",
    "degraded": "bold red",
}

#: Event kinds, by how an operator should read them.
EVENT_KIND_STYLE: dict[str, str] = {
    "join": "green",
    "alive": "green",
    "engine_ready": "green",
    "uncordon": "magenta",
    "drain": "magenta",
    "reload": "magenta",
    "replan": "cyan",
    "engine_start": "cyan",
    "engine_stop": "yellow",
    "waiting": "dim",
    "suspect": "bold yellow",
    "stall": "bold yellow",
    "warning": "yellow",
    "degraded": "bold red",
    "dead": "bold red",
    "refused": "red",
    "left": "yellow",
    "engine_crash": "bold red",
    "engine_failed": "bold red",
    "rpc_down": "red",
    "bad_frame": "red",
    "error": "bold red",
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


def as_int(value: Any, default: int = 0) -> int:
    """`value` as an int, or `default` when the head sent something else."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def as_float(value: Any) -> float | None:
    """`value` as a float, or None when the head sent something else."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def node_colours(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per node: by sorted name, so it does not depend on the API's order."""
    return {name: NODE_PALETTE[i % len(NODE_PALETTE)] for i, name in enumerate(sorted(set(names)))}


def fmt_bytes(n: Any) -> str:
    """1536 -> '1.5K'; compact binary units, for tables."""
    value = as_float(n)
    if value is None:
        return "—"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if abs(value) < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return f"{value:.0f}T"  # pragma: no cover


def fmt_age(seconds: Any) -> str:
    """Seconds -> '0.2s', '12s', '3m', '5h', '2d' (None -> '—')."""
    value = as_float(seconds)
    if value is None:
        return "—"
    s = max(0.0, value)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.0f}h"
    return f"{s / 86400:.0f}d"


def fmt_layers(layers: Any) -> str:
    """[start, end_exclusive] -> '0-14' (inclusive, as the head's events write it)."""
    if not isinstance(layers, (list, tuple)) or len(layers) != 2:
        return "—"
    start, end = as_int(layers[0]), as_int(layers[1])
    return f"{start}-{end - 1}" if end - start > 1 else f"{start}"


def styled(value: str, style_map: dict[str, str], *, default: str = "") -> Text:
    """`value` as a Text in its colour from `style_map`."""
    return Text(value, style=style_map.get(value, default))


def node_state(node: dict[str, Any]) -> Text:
    return styled(str(node.get("state", "?")), NODE_STATE_STYLE)


def memory_used_free(node: dict[str, Any]) -> str:
    mem = node.get("memory") or {}
    total, free = as_float(mem.get("total_bytes")), as_float(mem.get("free_bytes"))
    if total is None or free is None:
        return "—"
    return f"{fmt_bytes(total - free)}/{fmt_bytes(free)}"


def devices_summary(node: dict[str, Any]) -> str:
    """'cpu', 'gpu+cpu', '2gpu+cpu' (device types, counted when more than one)."""
    devices = node.get("devices") or []
    if not devices:
        return "—"
    counts: dict[str, int] = {}
    for d in devices:
        kind = str(d.get("type") or "?")
        counts[kind] = counts.get(kind, 0) + 1
    return "+".join(f"{n}{kind}" if n > 1 else kind for kind, n in counts.items())


def cpu_load(node: dict[str, Any]) -> str:
    cpu = as_float((node.get("load") or {}).get("cpu_percent"))
    return "—" if cpu is None else f"{cpu:.0f}%"
