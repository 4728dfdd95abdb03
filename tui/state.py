"""What every screen renders: one immutable snapshot of the head's state, replaced on each poll.

The app polls the head and assigns a new `Snapshot` to its reactive `snapshot`
attribute; screens watch it and re-render. Keeping it one value (not scattered
attributes) means a screen never sees half an update, and the snapshot tests can
build one from fixed data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Reachability = Literal["connecting", "ok", "unreachable", "error"]


@dataclass(frozen=True)
class Snapshot:
    """The last known cluster state plus how fresh it is."""

    #: Body of the last successful `GET /v1/cluster` (kept while the head is away).
    cluster: dict[str, Any] | None = None
    #: Events seen so far, newest first (bounded).
    events: tuple[dict[str, Any], ...] = ()
    #: "connecting" before the first answer, "ok", "unreachable" (no answer) or "error" (HTTP error).
    reach: Reachability = "connecting"
    #: Why the last poll failed, for the banner.
    error: str = ""
    #: Wall-clock time of the last poll (the app's injected clock), for event ages.
    now: float = 0.0
    #: tokens/s of the last polls, oldest first, for the sparkline.
    throughput: tuple[float, ...] = field(default=())

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return list((self.cluster or {}).get("nodes") or [])

    def node(self, name: str) -> dict[str, Any] | None:
        return next((n for n in self.nodes if n.get("name") == name), None)
