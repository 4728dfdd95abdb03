"""Throughput: the head's tokens/s over the last polls as a sparkline, and requests in flight.

The head reports only the current rate (`throughput.tokens_per_s`); the history is the
app's own record of what it polled (`Snapshot.throughput`), so it starts empty. The
sparkline is drawn from zero (not from the minimum), newest sample on the right, one
character per poll, so an idle cluster reads as a flat floor and a burst as a spike.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Label

from appliance.common.status import ClusterStatus

BARS = "▁▂▃▄▅▆▇█"


def spark_text(values: Sequence[float], *, width: int) -> Text:
    """The last `width` values as bars scaled from 0 to their maximum, right-aligned."""
    shown = list(values)[-width:] if width > 0 else []
    top = max(shown, default=0.0)
    text = Text(" " * (width - len(shown)), no_wrap=True)
    for v in shown:
        if top <= 0 or v <= 0:
            text.append(BARS[0], style="grey35")
        else:
            level = min(len(BARS) - 1, int(v / top * (len(BARS) - 1) + 0.5))
            text.append(BARS[level], style="green" if level < 5 else "bold bright_green")
    return text


class ThroughputSpark(Widget):
    """A one-line sparkline of tokens/s samples."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._values: tuple[float, ...] = ()

    def set_values(self, values: Sequence[float]) -> None:
        values = tuple(values)
        if values != self._values:
            self._values = values
            self.refresh()

    def render(self) -> RenderableType:
        return spark_text(self._values, width=self.content_size.width)


class Throughput(Horizontal):
    """`tok/s 12.3 ▁▂▅▇▅ in flight 2` on one line."""

    def compose(self) -> ComposeResult:
        yield Label(id="tps-label")
        yield ThroughputSpark(id="tps-spark")
        yield Label(id="inflight-label")

    def show(self, *, cluster: ClusterStatus | None, history: Sequence[float]) -> None:
        tps = cluster.throughput.tokens_per_s if cluster is not None else None
        inflight = cluster.throughput.requests_in_flight if cluster is not None else None
        label = Text("tok/s ", style="dim")
        label.append("—" if tps is None else f"{tps:.1f}", style="bold")
        self.query_one("#tps-label", Label).update(label)
        self.query_one(ThroughputSpark).set_values(history)
        text = Text("in flight ", style="dim")
        text.append("—" if inflight is None else str(inflight), style="bold" if inflight else "")
        self.query_one("#inflight-label", Label).update(text)
