"""The cluster's event log: joins, suspicions, deaths, re-plans, engine restarts, refusals.

A bounded in-memory ring with increasing ids, so the dashboard polls
`GET /v1/events?since=ID` and gets only what is new. Every event is also logged, at
the level its kind's severity says.
"""

from __future__ import annotations

import time
from collections import deque

from appliance.common import logs
from appliance.common.kinds import EventKind, Severity
from appliance.common.status import Event

log = logs.get("head.events")

EVENT_LOG_SIZE = 1000


class EventLog:
    def __init__(self, maxlen: int = EVENT_LOG_SIZE) -> None:
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._next = 1

    def add(self, kind: EventKind, message: str, *, node: str = "") -> Event:
        ev = Event(id=self._next, ts=time.time(), kind=kind, node=node, message=message)
        self._next += 1
        self._events.append(ev)
        emit = {Severity.INFO: log.info, Severity.WARNING: log.warning, Severity.ERROR: log.error}[kind.severity]
        emit(kind.value, node=node or None, msg=message)
        return ev

    def since(self, last_id: int = 0, limit: int = 200) -> list[Event]:
        out = [e for e in self._events if e.id > last_id]
        return out[-limit:]

    def for_node(self, node: str, limit: int = 50) -> list[Event]:
        return [e for e in self._events if e.node == node][-limit:]

    @property
    def last_id(self) -> int:
        return self._next - 1
