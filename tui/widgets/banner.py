"""The "head unreachable — retrying" banner: shown on every data screen while the head is away.

Kept visible (and loud) rather than a passing notification, because the data under it
is stale until the head answers again; it hides itself on the next good poll.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from ..state import Snapshot


class HeadBanner(Static):
    """One line over the screen's content; hidden while the head answers."""

    message = ""  #: the text shown, "" when hidden

    def show_snapshot(self, snapshot: Snapshot, *, url: str, retry_s: float) -> None:
        self.remove_class("unreachable", "error", "connecting")
        if snapshot.reach == "ok":
            self.display = False
            self.message = ""
            return
        self.display = True
        self.add_class(snapshot.reach)
        if snapshot.reach == "connecting":
            self.message = f"connecting to {url} …"
        else:
            what = "head unreachable" if snapshot.reach == "unreachable" else "head error"
            stale = " · showing the last known state" if snapshot.cluster is not None else ""
            self.message = f"⚠ {what} — retrying every {retry_s:g}s{stale}\n  {snapshot.error}"
        self.update(Text(self.message))
