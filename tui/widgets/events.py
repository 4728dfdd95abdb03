"""The events pane: joins, suspicions, deaths, re-plans, engine restarts, errors, newest first.

Each line is "age kind node message", the age relative to the app's clock (so it
reads "12s" rather than a wall time in some time zone), the kind in its colour, the
message cut to the width (the node detail screen shows a node's own events in full).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..format import EVENT_KIND_STYLE, as_float, fmt_age


def events_table(events: Sequence[dict[str, Any]], *, now: float, show_node: bool = True, wrap: bool = False) -> Table:
    """A borderless table of `events` (already in display order)."""
    table = Table(box=None, show_header=False, expand=True, padding=(0, 1, 0, 0), pad_edge=False)
    kinds = [len(str(ev.get("kind") or "")) for ev in events] or [4]
    nodes = [len(str(ev.get("node") or "")) for ev in events] or [0]
    table.add_column("age", justify="right", style="dim", no_wrap=True, width=4)
    table.add_column("kind", no_wrap=True, width=min(max(kinds), 13), overflow="ellipsis")
    if show_node and max(nodes):
        table.add_column("node", no_wrap=True, style="bold", width=min(max(nodes), 14), overflow="ellipsis")
    else:
        show_node = False
    table.add_column("message", ratio=1, no_wrap=not wrap, overflow="fold" if wrap else "ellipsis")
    for ev in events:
        kind = str(ev.get("kind") or "")
        cells: list[Text | str] = [
            fmt_age(now - (as_float(ev.get("ts")) or now)),
            Text(kind, style=EVENT_KIND_STYLE.get(kind, "")),
        ]
        if show_node:
            cells.append(str(ev.get("node") or ""))
        cells.append(Text(str(ev.get("message") or "")))
        table.add_row(*cells)
    return table


class EventList(Static):
    """The rendered event list (put it in a scrolling container)."""

    def show_events(self, events: Sequence[dict[str, Any]], *, now: float, show_node: bool = True) -> None:
        if not events:
            self.update(Text("no events yet", style="dim"))
            return
        self.update(events_table(events, now=now, show_node=show_node))
