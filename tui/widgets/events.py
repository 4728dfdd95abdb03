"""The events pane: joins, suspicions, deaths, re-plans, engine restarts, errors, newest first.

Each line is "age kind node message", the age relative to the app's clock (so it
reads "12s" rather than a wall time in some time zone), the kind in its colour, the
message cut to the width (the node detail screen shows a node's own events in full).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from appliance.common.status import Event

from ..format import EVENT_KIND_STYLE, fmt_age, styled


def events_table(events: Sequence[Event], *, now: float, show_node: bool = True, wrap: bool = False) -> Table:
    """A borderless table of `events` (already in display order)."""
    table = Table(box=None, show_header=False, expand=True, padding=(0, 1, 0, 0), pad_edge=False)
    kinds = [len(ev.kind.value) for ev in events] or [4]
    nodes = [len(ev.node) for ev in events] or [0]
    table.add_column("age", justify="right", style="dim", no_wrap=True, width=4)
    table.add_column("kind", no_wrap=True, width=min(max(kinds), 13), overflow="ellipsis")
    if show_node and max(nodes):
        table.add_column("node", no_wrap=True, style="bold", width=min(max(nodes), 14), overflow="ellipsis")
    else:
        show_node = False
    table.add_column("message", ratio=1, no_wrap=not wrap, overflow="fold" if wrap else "ellipsis")
    for ev in events:
        cells: list[Text | str] = [fmt_age(now - ev.ts), styled(ev.kind, EVENT_KIND_STYLE)]
        if show_node:
            cells.append(ev.node)
        cells.append(Text(ev.message))
        table.add_row(*cells)
    return table


class EventList(Static):
    """The rendered event list (put it in a scrolling container)."""

    def show_events(self, events: Sequence[Event], *, now: float, show_node: bool = True) -> None:
        if not events:
            self.update(Text("no events yet", style="dim"))
            return
        self.update(events_table(events, now=now, show_node=show_node))
