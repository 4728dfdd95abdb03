"""What every screen renders: one immutable snapshot of the head's state, replaced on each poll.

The app polls the head and assigns a new `Snapshot` to its reactive `snapshot`
attribute; screens watch it and re-render. Keeping it one value (not scattered
attributes) means a screen never sees half an update, and the snapshot tests can
build one from fixed data. Its contents are the API's own models
(appliance.common.status), parsed once by the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.common.status import ClusterStatus, Event, NodeStatus

Reachability = Literal["connecting", "ok", "unreachable", "error"]


@dataclass(frozen=True)
class Snapshot:
    """The last known cluster state plus how fresh it is."""

    #: The last successful `GET /v1/cluster` (kept while the head is away).
    cluster: ClusterStatus | None = None
    #: Events seen so far, newest first (bounded).
    events: tuple[Event, ...] = ()
    #: "connecting" before the first answer, "ok", "unreachable" (no answer) or "error" (HTTP error, odd answer).
    reach: Reachability = "connecting"
    #: Why the last poll failed, for the banner.
    error: str = ""
    #: Wall-clock time of the last poll on the head's clock, for event and join ages.
    now: float = 0.0
    #: tokens/s of the last polls, oldest first, for the sparkline.
    throughput: tuple[float, ...] = field(default=())

    @property
    def nodes(self) -> list[NodeStatus]:
        return list(self.cluster.nodes) if self.cluster is not None else []

    def node(self, name: str) -> NodeStatus | None:
        return self.cluster.node(name) if self.cluster is not None else None
