"""Finding a vanished worker in milliseconds, not heartbeat timeouts: the head's RPC probes.

When the engine dies or a control connection drops, the head probes the RPC port of
every node in the plan, a few times (RPC_PROBE_AFTER_S): a refused connection proves
that nothing listens there (the RPC server process is gone: killed, crashed, the box is
rebooting) and the node leaves the plan at once. A port that merely does not answer is
no proof (a busy box, a slow link) and is left to the heartbeat failure detector.
Nodes found refused are probed again each heartbeat interval until they answer. Before
an engine starts, every planned port is probed once, and a node that does not answer
is suspected, so the engine does not start on a plan that cannot load.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

from appliance.common import logs
from appliance.common.config import HeartbeatTiming, RecoveryTiming
from appliance.common.kinds import Liveness
from appliance.common.netprobe import Reach, probe_tcp, split_endpoint
from appliance.core.membership import Event, Membership
from appliance.core.planner import Plan

log = logs.get("head.probe")


class RpcProber:
    def __init__(
        self,
        *,
        membership: Membership,
        heartbeat: HeartbeatTiming,
        recovery: RecoveryTiming,
        on_events: Callable[[list[Event]], None],
        plans: Callable[[], Iterable[Plan | None]],
    ) -> None:
        """`plans()` gives the plans whose nodes an urgent round probes (loaded and desired)."""
        self.membership = membership
        self.hb = heartbeat
        self.t = recovery
        self.on_events = on_events
        self.plans = plans
        self.now_event = asyncio.Event()  # set when a worker may just have died
        self.rounds: list[float] = []  # when the next urgent probe rounds are due (monotonic)
        self._last_trigger = -1e9

    def trigger(self) -> None:
        """A worker may just have died (a control connection dropped, the engine died)."""
        self.now_event.set()

    async def probe_one(self, name: str, endpoint: str, *, mark_unanswered: bool) -> Reach:
        try:
            host, port = split_endpoint(endpoint)
        except ValueError:
            return Reach.UNREACHABLE
        result = await probe_tcp(host, port, self.t.RPC_PROBE_TIMEOUT_S)
        log.debug("rpc_probe", node=name, endpoint=endpoint, result=result.value)
        now = time.monotonic()
        m = self.membership
        if result == Reach.REFUSED:
            self.on_events(m.mark_unreachable(
                name, now=now, reason=f"RPC port {endpoint} refused the connection (server gone)", refused=True))
        elif result == Reach.UNREACHABLE and mark_unanswered:
            self.on_events(m.mark_unreachable(name, now=now, reason=f"RPC port {endpoint} did not answer"))
        elif result == Reach.OPEN:
            self.on_events(m.rpc_reachable(name, now=now))
        return result

    async def before_start(self, plan: Plan) -> bool:
        """Before loading, check each worker's RPC port answers. A refused port is suspected at
        once; one that does not answer is tried again for RPC_START_PROBE_GRACE_S (its server
        may still be finishing with the previous engine) and then suspected."""

        async def check(name: str, endpoint: str) -> Reach:
            deadline = time.monotonic() + self.t.RPC_START_PROBE_GRACE_S
            delay = 0.1
            while True:
                last = time.monotonic() + self.t.RPC_PROBE_TIMEOUT_S >= deadline
                result = await self.probe_one(name, endpoint, mark_unanswered=last)
                if result != Reach.UNREACHABLE or last:
                    return result
                await asyncio.sleep(min(delay, max(deadline - time.monotonic() - self.t.RPC_PROBE_TIMEOUT_S, 0)))
                delay = min(delay * 2, 1.0)

        results = await asyncio.gather(*(check(a.node, a.endpoint or "") for a in plan.rpc_assignments))
        return all(r == Reach.OPEN for r in results)

    def schedule(self, now: float) -> None:
        """Add a trigger's probe rounds. Triggers closer together than RPC_PROBE_TRIGGER_GAP_S
        share one series (a peer that connects and disconnects in a loop, authenticated or not,
        cannot make the head probe its workers without end), and rounds that would run within
        that gap of one another are one round."""
        if now - self._last_trigger < self.t.RPC_PROBE_TRIGGER_GAP_S:
            return
        self._last_trigger = now
        merged: list[float] = []
        for t in sorted([*self.rounds, *(now + d for d in self.t.RPC_PROBE_AFTER_S)]):
            if not merged or t - merged[-1] >= self.t.RPC_PROBE_TRIGGER_GAP_S:
                merged.append(t)
        self.rounds = merged

    async def loop(self) -> None:
        while True:
            now = time.monotonic()
            wait_s = min([self.hb.HEARTBEAT_INTERVAL_S, *(t - now for t in self.rounds)])
            try:
                await asyncio.wait_for(self.now_event.wait(), timeout=max(wait_s, 0.0))
                self.now_event.clear()
                self.schedule(time.monotonic())
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            urgent = bool(self.rounds) and self.rounds[0] <= now + 0.001
            self.rounds = [t for t in self.rounds if t > now + 0.001]
            targets: dict[str, str] = {}
            if urgent:
                for plan in self.plans():
                    for a in plan.rpc_assignments if plan else []:
                        targets[a.node] = a.endpoint or ""
            else:
                for n in self.membership.nodes.values():
                    if n.rpc_refused and n.state in (Liveness.ALIVE, Liveness.SUSPECT, Liveness.JOINING):
                        targets[n.name] = n.rpc_endpoint
            if targets:
                await asyncio.gather(*(self.probe_one(k, v, mark_unanswered=False) for k, v in targets.items()))
