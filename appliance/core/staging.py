"""What each worker should hold on its disk so that losing any one node sends no weights.

ggml's RPC backend skips sending a weight tensor over 10 MiB when the server's cache
directory already has a file named by the tensor's FNV-1a hash. With stable re-plans
(planner.replan_without) the plan after losing node X is known while X is alive, and so
are the layers each survivor would newly receive. This module computes, purely, for one
plan: per node, the tensors it `needs` (its own layers: they are in its cache after the
load, keep them for a fast reload) and the tensors it `wants` (the layers it would take
over from any one other node), and per node X the bytes a failover would move and which
of them can be staged at all (tensors under ggml's threshold are always sent).

The head sends each worker its lists (appliance.head.staging); the worker fetches what it
lacks in the background, within its disk quota (appliance.worker.cache).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from appliance.core.planner import Plan

HASH_THRESHOLD_BYTES = 10 * 1024 * 1024  # ggml-rpc.cpp: tensors larger than this are hash-cached
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor of the model file: where its bytes are, and their cache name."""

    name: str
    offset: int  # in the GGUF file
    size: int
    hash: str = ""  # FNV-1a 64 as 16 hex digits (only for tensors over the threshold)

    @property
    def cacheable(self) -> bool:
        return self.size > HASH_THRESHOLD_BYTES


@dataclass(frozen=True)
class ModelTensors:
    """The model's tensors by where they go: per layer, and with the output device."""

    layers: tuple[tuple[TensorInfo, ...], ...]
    output: tuple[TensorInfo, ...]

    @classmethod
    def from_table(cls, tensors: Iterable[TensorInfo], *, n_layers: int) -> "ModelTensors":
        per_layer: list[list[TensorInfo]] = [[] for _ in range(n_layers)]
        output: list[TensorInfo] = []
        embd: TensorInfo | None = None
        has_output = False
        for t in tensors:
            m = _BLOCK.match(t.name)
            if m and int(m.group(1)) < n_layers:
                per_layer[int(m.group(1))].append(t)
            elif t.name.startswith("output"):
                output.append(t)
                has_output = has_output or t.name == "output.weight"
            elif t.name == "token_embd.weight":
                embd = t
        if not has_output and embd is not None:
            output.append(embd)  # tied embeddings: llama.cpp sends token_embd as the output projection
        return cls(layers=tuple(tuple(x) for x in per_layer), output=tuple(output))

    def of(self, start: int, end: int, *, output: bool) -> list[TensorInfo]:
        out = [t for i in range(start, end) for t in self.layers[i]]
        return out + list(self.output) if output else out


@dataclass(frozen=True)
class Failover:
    """What losing `node` would cost: bytes of weights the survivors would receive."""

    node: str
    possible: bool  # a stable re-plan exists (else a fresh plan moves more)
    bytes: int = 0  # all weights that would move
    cacheable_bytes: int = 0  # of which ggml would look up in the survivors' caches
    receivers: Mapping[str, tuple[TensorInfo, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeStaging:
    need: tuple[TensorInfo, ...]  # cacheable tensors of its own layers
    want: tuple[TensorInfo, ...]  # cacheable tensors it would take over from one other node

    @property
    def hashes(self) -> frozenset[str]:
        return frozenset(t.hash for t in (*self.need, *self.want))


def _gained(before: Plan, after: Plan, node: str, tensors: ModelTensors) -> list[TensorInfo]:
    """Tensors `node` holds in `after` but not in `before`."""
    a = next(x for x in after.assignments if x.node == node)
    b = next((x for x in before.assignments if x.node == node), None)
    had = {t.name for t in tensors.of(b.start, b.end, output=before.output_node == node)} if b else set()
    return [t for t in tensors.of(a.start, a.end, output=after.output_node == node) if t.name not in had]


def failovers(
    plan: Plan, *, tensors: ModelTensors, failover_plans: Mapping[str, Plan | None]
) -> dict[str, Failover]:
    """Per RPC node of `plan`: what its loss would move, given the plan that would follow."""
    out: dict[str, Failover] = {}
    for a in plan.rpc_assignments:
        after = failover_plans.get(a.node)
        if after is None:
            out[a.node] = Failover(node=a.node, possible=False)
            continue
        receivers = {
            s.node: tuple(_gained(plan, after, s.node, tensors)) for s in after.rpc_assignments
        }
        receivers = {k: v for k, v in receivers.items() if v}
        moved = [t for ts in receivers.values() for t in ts]
        out[a.node] = Failover(
            node=a.node,
            possible=True,
            bytes=sum(t.size for t in moved),
            cacheable_bytes=sum(t.size for t in moved if t.cacheable),
            receivers=receivers,
        )
    return out


def staging(plan: Plan, *, tensors: ModelTensors, failover: Mapping[str, Failover]) -> dict[str, NodeStaging]:
    """Per RPC node of `plan`: the cacheable tensors to keep (`need`) and to pre-stage (`want`)."""
    out: dict[str, NodeStaging] = {}
    for a in plan.rpc_assignments:
        need = [t for t in tensors.of(a.start, a.end, output=plan.output_node == a.node) if t.cacheable]
        seen = {t.hash for t in need}
        want: list[TensorInfo] = []
        for f in failover.values():
            for t in f.receivers.get(a.node, ()):
                if t.cacheable and t.hash not in seen:
                    seen.add(t.hash)
                    want.append(t)
        out[a.node] = NodeStaging(need=tuple(need), want=tuple(want))
    return out


def staged_failovers(failover: Mapping[str, Failover], missing: Mapping[str, Sequence[str]]) -> dict[str, bool]:
    """Per node X: would losing X send no cacheable weights (every receiver has them)?
    `missing[node]` lists the hashes a worker reported it still lacks (absent: unknown)."""
    out: dict[str, bool] = {}
    for x, f in failover.items():
        if not f.possible:
            out[x] = False
            continue
        ok = True
        for node, ts in f.receivers.items():
            lacks = missing.get(node)
            if lacks is None or any(t.hash in set(lacks) for t in ts if t.cacheable):
                ok = False
        out[x] = ok
    return out
