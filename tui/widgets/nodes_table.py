"""The nodes table: one row per node the head knows, as `/v1/cluster` reports it.

Rows are keyed by node name and updated in place, so the cursor stays on the node
the operator selected across refreshes (the drain / uncordon / detail actions act
on that row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from appliance.common.status import NodeStatus

from ..format import busy, cpu_load, devices_summary, fmt_age, fmt_layers, memory_used_free, node_state

COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "node"),
    ("address", "address"),
    ("state", "state"),
    ("hb", "hb"),
    ("devices", "dev"),
    ("memory", "used/free"),
    ("layers", "layers"),
    ("cpu", "cpu"),
    ("busy", "busy"),
)


def node_row(node: NodeStatus, *, colour: str | None) -> tuple[Text | str, ...]:
    """The cells of one node's row, in `COLUMNS` order."""
    layers = fmt_layers(node.layers)
    if node.n_layers:
        layers = f"{layers} ({node.n_layers})"
    return (
        Text(node.name, style=f"bold {colour}" if colour else "bold"),
        node.address or "—",
        node_state(node),
        fmt_age(node.heartbeat_age_s),
        devices_summary(node),
        memory_used_free(node),
        layers,
        cpu_load(node),
        busy(node),
    )


class NodesTable(DataTable[Any]):
    """A DataTable of the cluster's nodes (by name); `selected_node` is the row under the cursor."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Details")]

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    @property
    def node_names(self) -> list[str]:
        return [str(row.key.value) for row in self.ordered_rows]

    @property
    def selected_node(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except Exception:  # noqa: BLE001 - no valid cell under the cursor (mid-update): no selection
            return None
        return None if key.value is None else str(key.value)

    def show_nodes(self, nodes: Sequence[NodeStatus], *, colours: dict[str, str]) -> None:
        ordered = sorted(nodes, key=lambda n: n.name)
        names = [n.name for n in ordered]
        rows = {n.name: node_row(n, colour=colours.get(n.name)) for n in ordered}
        if names == self.node_names:
            for name, cells in rows.items():
                for (col, _), value in zip(COLUMNS, cells, strict=True):
                    self.update_cell(name, col, value)
            return
        selected = self.selected_node
        self.clear()
        for name in names:
            self.add_row(*rows[name], key=name)
        if selected in names:
            self.move_cursor(row=names.index(selected), animate=False)
