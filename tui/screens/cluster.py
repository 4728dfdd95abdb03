"""The cluster screen, the dashboard's home: engine, throughput, layer map, nodes, events.

Everything on it is a rendering of the app's current `Snapshot`; its key bindings
(drain, uncordon, reload, detail) act on the node under the table's cursor through
the app, which asks for confirmation and reports the head's answer.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header

from ..format import node_colours
from ..state import Snapshot
from ..widgets.banner import HeadBanner
from ..widgets.engine import EngineStatus
from ..widgets.events import EventList
from ..widgets.layer_map import LayerMap, slices_from_plan
from ..widgets.nodes_table import NodesTable
from ..widgets.throughput import Throughput
from .base import SnapshotScreen


def plan_colours(snapshot: Snapshot) -> dict[str, str]:
    """Node colours shared by the table and the layer map (nodes + any plan-only holder)."""
    plan = snapshot.cluster.plan if snapshot.cluster is not None else None
    names = [n.name for n in snapshot.nodes] + [s.node for s in slices_from_plan(plan)]
    return node_colours(names)


class ClusterScreen(SnapshotScreen):
    """Engine, throughput and layers on top, the nodes table, then the events pane."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "details", "Details"),
        Binding("d", "drain", "Drain"),
        Binding("D", "force_drain", "Force drain", show=False),
        Binding("u", "uncordon", "Uncordon"),
        Binding("r", "reload", "Reload"),
        Binding("c", "app.chat", "Chat"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield HeadBanner(id="banner")
        with Vertical(id="summary"):
            yield EngineStatus(id="engine")
            yield Throughput(id="throughput")
            yield LayerMap(id="layer-map")
        yield NodesTable(id="nodes")
        with VerticalScroll(id="events-pane"):
            yield EventList(id="events")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#summary").border_title = "cluster"
        self.query_one("#nodes").border_title = "nodes"
        self.query_one("#events-pane").border_title = "events"
        self.query_one(NodesTable).focus()
        self.follow_snapshot()

    def show_snapshot(self, snapshot: Snapshot) -> None:
        self.query_one(HeadBanner).show_snapshot(
            snapshot, url=self.anyway.source.label, retry_s=self.anyway.refresh_s
        )
        self.set_class(snapshot.reach != "ok" and snapshot.cluster is not None, "stale")
        cluster = snapshot.cluster
        colours = plan_colours(snapshot)
        self.query_one(EngineStatus).show_cluster(cluster)
        self.query_one(Throughput).show(cluster=cluster, history=snapshot.throughput)
        self.query_one(LayerMap).set_plan(
            n_layers=cluster.model.n_layers if cluster is not None else 0,
            slices=slices_from_plan(cluster.plan if cluster is not None else None),
            colours=colours,
        )
        self.query_one(NodesTable).show_nodes(snapshot.nodes, colours=colours)
        self.query_one(EventList).show_events(snapshot.events, now=snapshot.now)

    # ------------------------------------------------------------ actions
    def _selected(self) -> str | None:
        name = self.query_one(NodesTable).selected_node
        if name is None:
            self.notify("no node selected", severity="warning")
        return name

    def action_details(self) -> None:
        name = self._selected()
        if name is not None:
            from .node import NodeScreen

            self.app.push_screen(NodeScreen(node=name))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_details()

    def action_drain(self) -> None:
        name = self._selected()
        if name is not None:
            self.anyway.confirm_drain(name)

    def action_force_drain(self) -> None:
        name = self._selected()
        if name is not None:
            self.anyway.confirm_drain(name, force=True)

    def action_uncordon(self) -> None:
        name = self._selected()
        if name is not None:
            self.anyway.confirm_uncordon(name)

    def action_reload(self) -> None:
        self.anyway.confirm_reload()
