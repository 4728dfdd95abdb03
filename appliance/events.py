"""The cluster's event log: joins, suspicions, deaths, re-plans, engine restarts, errors.

A bounded in-memory ring with increasing ids, so the dashboard polls
`GET /v1/events?since=ID` and gets only what is new. Every event is also logged.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from . import logs

log = logs.get("head.events")

WARN_KINDS = frozenset({"suspect", "dead", "refused", "engine_crash", "engine_failed", "degraded", "warning", "rpc_down", "bad_frame", "stall"})


@dataclass(frozen=True)
class ClusterEvent:
    id: int
    ts: float  # wall clock, seconds since the epoch
    kind: str
    node: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    def __init__(self, maxlen: int = 1000) -> None:
        self._events: deque[ClusterEvent] = deque(maxlen=maxlen)
        self._next = 1

    def add(self, kind: str, message: str, *, node: str = "") -> ClusterEvent:
        ev = ClusterEvent(id=self._next, ts=time.time(), kind=kind, node=node, message=message)
        self._next += 1
        self._events.append(ev)
        (log.warning if kind in WARN_KINDS else log.info)(kind, node=node or None, msg=message)
        return ev

    def since(self, last_id: int = 0, limit: int = 200) -> list[ClusterEvent]:
        out = [e for e in self._events if e.id > last_id]
        return out[-limit:]

    def for_node(self, node: str, limit: int = 50) -> list[ClusterEvent]:
        return [e for e in self._events if e.node == node][-limit:]

    @property
    def last_id(self) -> int:
        return self._next - 1
