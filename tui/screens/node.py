"""Node detail (enter on a row): one node's devices, versions, load, memory history and events.

Opened from the cluster screen; follows the same snapshot, and fetches the node's own
events (`GET /v1/events?node=NAME`) whenever the head logs something new. Drain and
uncordon work here too.
"""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Label, Sparkline, Static

from appliance.common.status import NodeStatus

from ..format import busy, cpu_load, fmt_age, fmt_bytes, fmt_layers, memory_used_free, node_state
from ..source import SourceError
from ..state import Snapshot
from ..widgets.banner import HeadBanner
from ..widgets.events import EventList
from .base import SnapshotScreen


def _kv_table() -> Table:
    table = Table(box=None, show_header=False, padding=(0, 1, 0, 0), pad_edge=False)
    table.add_column("key", style="dim", no_wrap=True)
    table.add_column("value", overflow="fold")
    return table


def node_summary(node: NodeStatus, *, now: float) -> Table:
    """State, addresses, heartbeat, layers, memory and load of one node."""
    t = _kv_table()
    state = node_state(node)
    if node.reason:
        state.append(f"  {node.reason}", style="yellow")
    t.add_row("state", state)
    t.add_row("address", f"{node.address or '—'}  (host {node.hostname or '—'})")
    t.add_row("rpc", (node.rpc_endpoint or "—") + ("" if node.rpc_ready else "  (not ready)"))
    t.add_row("heartbeat", f"{fmt_age(node.heartbeat_age_s)} ago")
    t.add_row("joined", "—" if not node.joined_at else f"{fmt_age(now - node.joined_at)} ago")
    t.add_row("layers", fmt_layers(node.layers) + (f"  ({node.n_layers} layers)" if node.n_layers else ""))
    mem, load = node.memory, node.load
    t.add_row(
        "memory",
        f"used/free {memory_used_free(node)}  total {fmt_bytes(mem.total_bytes)}  "
        f"plannable {fmt_bytes(mem.plannable_bytes)}  planned {fmt_bytes(mem.planned_bytes)}",
    )
    ram = "—" if load.ram_percent is None else f"{load.ram_percent:.0f}%"
    loadavg = "—" if load.loadavg_1m is None else f"{load.loadavg_1m:.2f}"
    t.add_row(
        "load",
        f"cpu {cpu_load(node)}  busy {busy(node)}  ram {ram}  load1 {loadavg}  rpc rss {fmt_bytes(load.rpc_rss_bytes)}  "
        f"speed {node.speed}",
    )
    return t


def devices_table(node: NodeStatus) -> Table | Text:
    if not node.devices:
        return Text("no devices reported", style="dim")
    t = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, header_style="dim")
    for col in ("device", "type", "description", "free", "total"):
        t.add_column(col, no_wrap=True)
    for d in node.devices:
        t.add_row(d.name or "?", d.type or "?", d.description, fmt_bytes(d.free_bytes), fmt_bytes(d.total_bytes))
    return t


def versions_line(node: NodeStatus) -> Text:
    v = node.versions
    text = Text()
    for value, label in (
        (v.package, "anyway"),
        (v.llama_cpp, "llama.cpp"),
        (v.rpc_protocol, "rpc"),
        (v.protocol, "control"),
    ):
        if text:
            text.append("  ")
        text.append(f"{label} ", style="dim")
        text.append(value or "—")
    return text


class NodeScreen(SnapshotScreen):
    """Everything the head knows about one node."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("d", "drain", "Drain"),
        Binding("D", "force_drain", "Force drain", show=False),
        Binding("u", "uncordon", "Uncordon"),
    ]

    def __init__(self, *, node: str) -> None:
        super().__init__()
        self.node_name = node
        self._events_for = -1

    def compose(self) -> ComposeResult:
        yield Header()
        yield HeadBanner(id="banner")
        with VerticalScroll(id="node-body"):
            with Vertical(id="node-info", classes="panel"):
                yield Static(id="node-summary")
                yield Static(id="node-versions")
            with Vertical(id="node-devices", classes="panel"):
                yield Static(id="node-devices-table")
            with Vertical(id="node-memory", classes="panel"):
                with Horizontal(id="memory-row"):
                    yield Sparkline([], id="memory-spark")
                yield Label(id="memory-range")
            with Vertical(id="node-events", classes="panel"):
                yield EventList(id="node-event-list")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#node-info").border_title = f"node {self.node_name}"
        self.query_one("#node-devices").border_title = "devices"
        self.query_one("#node-memory").border_title = "memory used (history)"
        self.query_one("#node-events").border_title = "recent events"
        self.follow_snapshot()

    def show_snapshot(self, snapshot: Snapshot) -> None:
        self.query_one(HeadBanner).show_snapshot(snapshot, url=self.anyway.source.label, retry_s=self.anyway.refresh_s)
        node = snapshot.node(self.node_name)
        summary = self.query_one("#node-summary", Static)
        if node is None:
            summary.update(Text(f"the head does not know a node named {self.node_name!r} (any more)", style="yellow"))
            return
        summary.update(node_summary(node, now=snapshot.now))
        self.query_one("#node-versions", Static).update(versions_line(node))
        self.query_one("#node-devices-table", Static).update(devices_table(node))
        self._show_memory(node)
        last_id = snapshot.cluster.events_last_id if snapshot.cluster is not None else 0
        if snapshot.reach == "ok" and last_id != self._events_for:
            self._events_for = last_id
            self.run_worker(self._load_events(now=snapshot.now), group="node-events", exclusive=True, exit_on_error=False)

    def _show_memory(self, node: NodeStatus) -> None:
        total = float(node.memory.total_bytes)
        history = [(float(ts), float(free)) for ts, free in node.memory_history]
        spark = self.query_one("#memory-spark", Sparkline)
        label = self.query_one("#memory-range", Label)
        if not history or not total:
            spark.data = [0.0]
            label.update(Text("no memory samples yet", style="dim"))
            return
        used = [total - free for _, free in history]
        if list(spark.data or []) != used:
            spark.data = used
        span = history[-1][0] - history[0][0]
        text = Text()
        text.append("now ", style="dim")
        text.append(fmt_bytes(used[-1]), style="bold")
        text.append(f"  min {fmt_bytes(min(used))}  max {fmt_bytes(max(used))}", style="")
        text.append(f"  over the last {fmt_age(span)} ({len(used)} samples)", style="dim")
        label.update(text)

    async def _load_events(self, *, now: float) -> None:
        try:
            page = await self.anyway.source.events(node=self.node_name)
        except SourceError:
            return  # the banner already says the head is away
        events = list(reversed(page.events))[:50]
        self.query_one("#node-event-list", EventList).show_events(events, now=now, show_node=False)

    # ------------------------------------------------------------ actions
    def action_back(self) -> None:
        self.app.pop_screen()

    def action_drain(self) -> None:
        self.anyway.confirm_drain(self.node_name)

    def action_force_drain(self) -> None:
        self.anyway.confirm_drain(self.node_name, force=True)

    def action_uncordon(self) -> None:
        self.anyway.confirm_uncordon(self.node_name)
