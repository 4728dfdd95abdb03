"""Per-worker model-load progress, in bytes and bytes/s, measured where the bytes arrive.

The engine reports one fraction for the whole load; an operator of a 40 GB model on a
1 Gbit/s LAN wants to see which box is receiving what, and how fast. Each worker reports
its RPC server's read counter (socket and file reads: weights from the network, or from
its cache) in every heartbeat; from the counters at the start of a load, the weights each
node is to hold (the plan), and the last few samples, this gives bytes done and bytes/s.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping

from appliance.common.status import LoadProgress
from appliance.core.membership import Node
from appliance.core.planner import Plan

RATE_WINDOW_S = 2.0


class LoadMeter:
    def __init__(self) -> None:
        self.base: dict[str, float] = {}
        self.total: dict[str, int] = {}
        self.samples: dict[str, deque[tuple[float, float]]] = {}

    def start(self, plan: Plan, nodes: Mapping[str, Node], now: float) -> None:
        """A load begins: the counters now are its zero."""
        self.base, self.total, self.samples = {}, {}, {}
        for a in plan.rpc_assignments:
            read = self._read(nodes.get(a.node))
            self.base[a.node] = read if read is not None else 0.0
            self.total[a.node] = a.weight_bytes + a.extra_bytes
            self.samples[a.node] = deque([(now, self.base[a.node])])

    @staticmethod
    def _read(node: Node | None) -> float | None:
        v = node.load.get("rpc_read_bytes") if node is not None else None
        return float(v) if isinstance(v, (int, float)) else None

    def sample(self, nodes: Mapping[str, Node], now: float) -> None:
        for name, q in self.samples.items():
            read = self._read(nodes.get(name))
            if read is None:
                continue
            if read < self.base[name]:  # its RPC server restarted: its counter did too
                self.base[name] = 0.0
            if not q or read != q[-1][1]:
                q.append((now, read))
            while len(q) > 2 and now - q[0][0] > RATE_WINDOW_S:
                q.popleft()

    def progress(self) -> list[LoadProgress]:
        out = []
        for name, q in self.samples.items():
            t_last, last = q[-1]
            t_first, first = q[0]
            rate = (last - first) / (t_last - t_first) if t_last > t_first else 0.0
            done = min(max(last - self.base[name], 0.0), float(self.total[name]))
            out.append(LoadProgress(node=name, bytes=int(done), total_bytes=self.total[name],
                                    bytes_per_s=round(max(rate, 0.0), 1)))
        return out
