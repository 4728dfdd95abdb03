"""The layer map: the model's layers as one bar, each cell coloured by the node holding it.

It answers "who holds what" at a glance, and makes a drain or a re-plan visible as the
colours move. It draws only the head's plan (`plan.assignments`); layers no node holds
(no plan yet, or a degraded cluster) show as a dim track.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import RenderableType
from rich.text import Text
from textual.widget import Widget

from appliance.common.status import PlanStatus

from ..format import fmt_layers

EMPTY_STYLE = "grey35"


@dataclass(frozen=True)
class LayerSlice:
    """Layers [start, end) held by `node` (the head itself when `is_head`)."""

    node: str
    start: int
    end: int
    is_head: bool = False


def slices_from_plan(plan: PlanStatus | None) -> list[LayerSlice]:
    """The plan's assignments as slices, in layer order (nodes holding no layer left out)."""
    if plan is None:
        return []
    out = [
        LayerSlice(node=a.node, start=a.start, end=a.end, is_head=a.is_head)
        for a in plan.assignments
        if a.end > a.start
    ]
    return sorted(out, key=lambda s: s.start)


class LayerMap(Widget):
    """A bar of `n_layers` cells (scaled to the width) and a legend: node, layers, count."""

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._n_layers = 0
        self._slices: list[LayerSlice] = []
        self._colours: dict[str, str] = {}

    def set_plan(self, *, n_layers: int, slices: Sequence[LayerSlice], colours: dict[str, str]) -> None:
        new = (int(n_layers), list(slices), dict(colours))
        if new != (self._n_layers, self._slices, self._colours):
            self._n_layers, self._slices, self._colours = new
            self.refresh(layout=True)

    def owner_of(self, layer: int) -> str | None:
        """The node holding `layer`, or None."""
        return next((s.node for s in self._slices if s.start <= layer < s.end), None)

    def render(self) -> RenderableType:
        width = max(1, self.content_size.width or 40)
        n = self._n_layers
        bar = Text(no_wrap=True, overflow="crop")
        if n <= 0:
            bar.append("·" * width, style=EMPTY_STYLE)
        else:
            owners = [self.owner_of(layer) for layer in range(n)]
            for cell in range(width):
                owner = owners[min(n - 1, cell * n // width)]
                if owner is None:
                    bar.append("░", style=EMPTY_STYLE)
                else:
                    bar.append("█", style=self._colours.get(owner, "white"))
        legend = Text()
        if not self._slices:
            legend.append("no layers placed" if n else "no model loaded", style="dim")
        for i, s in enumerate(self._slices):
            if i:
                legend.append("  ")
            legend.append("■ ", style=self._colours.get(s.node, "white"))
            legend.append(s.node, style="bold")
            legend.append(f" {fmt_layers((s.start, s.end))}", style="")
            legend.append(f" ({s.end - s.start})", style="dim")
        held = sum(s.end - s.start for s in self._slices)
        if n and held < n:
            legend.append(f"  ░ {n - held} unplaced", style="yellow")
        return Text("\n").join([bar, legend])
