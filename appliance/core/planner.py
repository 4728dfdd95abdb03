"""Placement planner: which contiguous layers go to which node. A pure function.

`make_plan(nodes=..., profile=..., n_ctx=...)` takes the nodes' free memory (and an
optional speed weight each) and the model profile, and returns a `Plan`: one layer range
per node, the memory each range needs (weights + KV cache for the context + a compute
reserve), and the `tensor_split` / `n_gpu_layers` values that make llama.cpp place
exactly those ranges.

How llama.cpp places layers (llama-model.cpp, `load_tensors`), which the plan inverts:
  * the token embeddings (input layer) always stay on the head's CPU;
  * the output layer counts as layer number `n_layer`, so there are `n_layer + 1`;
  * the first `n_layer + 1 - n_gpu_layers` of them stay on the head's CPU;
  * the rest are split over the devices (RPC devices first, in registration order) by
    the cumulative fractions of `tensor_split`: layer i goes to the first device whose
    cumulative fraction exceeds i / n_gpu_layers.
So with integer layer counts as `tensor_split` (the last device counting the output as
one more), device i gets exactly its count and the output lands on the last RPC device
(seen in llama.cpp's load log: docs/ARCHITECTURE.md, "Layer placement").

Three strategies:
  * "memory": layers in proportion to usable memory, like llama.cpp's default split;
  * "proportional": layers in proportion to usable memory x speed weight (the weight lets
    an operator favour a box);
  * "speed": minimise the time per token, sum(layers_i / speed_i), under the memory
    limits: fill the fastest nodes first (RPC evaluates the layers one node after the
    other, so per-token time is a sum and the fastest box should do as much as it can).
    Speeds are measured, hence noisy: nodes within 30% of each other form one class and
    share its layers in proportion to memory, as the proportional strategy would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from appliance.core.profile import ModelProfile

MIB = 1024 * 1024
GIB = 1024 * MIB
COMPUTE_BASE_RESERVE_BYTES = 48 * MIB
DEFAULT_UBATCH = 512
LOGIT_BYTES = 4

Strategy = Literal["memory", "proportional", "speed"]


class PlanError(Exception):
    """The model cannot be placed; `str()` says what is needed, what exists, what helps."""

    def __init__(self, message: str, *, needed_bytes: int = 0, available_bytes: int = 0) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


@dataclass(frozen=True)
class NodeCapacity:
    """One placement target: a worker's RPC device, or the head's own CPU."""

    name: str
    free_bytes: int
    speed: float = 1.0
    is_head: bool = False
    endpoint: str | None = None  # "host:port" of the RPC server; None for the head


@dataclass(frozen=True)
class Assignment:
    node: str
    endpoint: str | None
    is_head: bool
    start: int  # first layer, inclusive
    end: int  # last layer, exclusive
    weight_bytes: int
    kv_bytes: int
    reserve_bytes: int
    extra_bytes: int  # input and/or output layer
    free_bytes: int

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.reserve_bytes + self.extra_bytes


@dataclass(frozen=True)
class Plan:
    assignments: tuple[Assignment, ...]  # device order: head first, then RPC registration order
    n_layers: int
    n_ctx: int
    strategy: str
    output_node: str
    excluded: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (node, reason)
    lanes: int = 1  # engine contexts sharing the weights (appliance.engine.lanes): each has compute buffers

    @property
    def rpc_assignments(self) -> tuple[Assignment, ...]:
        return tuple(a for a in self.assignments if not a.is_head)

    @property
    def head_layers(self) -> int:
        return sum(a.n_layers for a in self.assignments if a.is_head)

    @property
    def rpc_endpoints(self) -> list[str]:
        return [a.endpoint or "" for a in self.rpc_assignments]

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers: the layers (output included) not on the head's CPU."""
        if not self.rpc_assignments:
            return 0
        return self.n_layers + 1 - self.head_layers

    @property
    def tensor_split(self) -> list[float]:
        """One entry per RPC device in registration order (see the module docstring)."""
        split = [float(a.n_layers) for a in self.rpc_assignments]
        if split:
            split[-1] += 1.0  # the output layer counts as one more on the last device
        return split

    @property
    def nodes(self) -> list[str]:
        return [a.node for a in self.assignments]

    def time_per_token(self, speeds: dict[str, float]) -> float:
        """Relative per-token cost: sum over nodes of layers / speed."""
        return sum(a.n_layers / max(speeds.get(a.node, 1.0), 1e-9) for a in self.assignments)

    def key(self) -> tuple[Any, ...]:
        """What identifies a loaded layout: equal keys need no reload."""
        return (self.n_ctx, self.lanes, tuple((a.node, a.endpoint, a.start, a.end) for a in self.assignments))

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "n_layers": self.n_layers,
            "n_ctx": self.n_ctx,
            "lanes": self.lanes,
            "output_node": self.output_node,
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": self.tensor_split,
            "rpc_endpoints": self.rpc_endpoints,
            "assignments": [
                {**asdict(a), "layers": [a.start, a.end], "n_layers": a.n_layers, "total_bytes": a.total_bytes}
                for a in self.assignments
            ],
            "excluded": [{"node": n, "reason": r} for n, r in self.excluded],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        fields_ = {f for f in Assignment.__dataclass_fields__}
        return cls(
            assignments=tuple(
                Assignment(**{k: v for k, v in a.items() if k in fields_}) for a in d["assignments"]
            ),
            n_layers=d["n_layers"],
            n_ctx=d["n_ctx"],
            strategy=d["strategy"],
            output_node=d["output_node"],
            excluded=tuple((e["node"], e["reason"]) for e in d.get("excluded", [])),
            lanes=int(d.get("lanes", 1)),
        )


def compute_reserve_bytes(
    *, profile: ModelProfile, n_ctx: int, output: bool, n_ubatch: int = DEFAULT_UBATCH, lanes: int = 1
) -> int:
    """A conservative estimate of llama.cpp's compute buffers on one device.

    Activations for one micro-batch, the attention score matrix (no flash attention:
    n_kv x n_ubatch x n_head floats), and on the output device the logits. With several
    lanes each context has its own buffers over its share of the context.
    """
    lanes = max(lanes, 1)
    n_ctx_lane = -(-max(n_ctx, 1) // lanes)
    n_embd = max(profile.embedding_length, 1)
    n_head_guess = max(n_embd // 64, 1)
    ubatch = min(n_ubatch, n_ctx_lane)
    activations = 8 * n_embd * ubatch * 4
    scores = n_ctx_lane * ubatch * n_head_guess * 4
    logits = profile.vocab_size * ubatch * LOGIT_BYTES if output else 0
    return lanes * (COMPUTE_BASE_RESERVE_BYTES + activations + scores + logits)


def _per_layer_bytes(profile: ModelProfile, n_ctx: int) -> int:
    return profile.max_layer_bytes + profile.kv_bytes_per_token_per_layer * n_ctx


def _fixed_bytes(profile: ModelProfile, n_ctx: int, *, head: bool, output: bool, lanes: int = 1) -> tuple[int, int]:
    """(reserve, extra) bytes a node needs before its first layer."""
    extra = (profile.input_bytes if head else 0) + (profile.output_bytes if output else 0)
    return compute_reserve_bytes(profile=profile, n_ctx=n_ctx, output=output, lanes=lanes), extra


def _room(node: NodeCapacity, profile: ModelProfile, n_ctx: int, *, output: bool, lanes: int = 1) -> int:
    reserve, extra = _fixed_bytes(profile, n_ctx, head=node.is_head, output=output, lanes=lanes)
    return max(0, node.free_bytes - reserve - extra)


def _cap(node: NodeCapacity, profile: ModelProfile, n_ctx: int, *, output: bool, lanes: int = 1) -> int:
    room = _room(node, profile, n_ctx, output=output, lanes=lanes)
    per = _per_layer_bytes(profile, n_ctx)
    return max(0, min(profile.n_layers, room // per)) if per > 0 else profile.n_layers


def _proportional(weights: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """Integer split of `total` in proportion to `weights`, never above `caps` (water-filling)."""
    n = len(weights)
    counts = [0] * n
    fixed = [caps[i] == 0 or weights[i] <= 0 for i in range(n)]
    remaining = total
    while True:
        free_idx = [i for i in range(n) if not fixed[i]]
        if not free_idx or remaining <= 0:
            break
        wsum = sum(weights[i] for i in free_idx)
        ideal = {i: remaining * weights[i] / wsum for i in free_idx}
        over = [i for i in free_idx if ideal[i] > caps[i]]
        if over:
            for i in over:
                counts[i] = caps[i]
                fixed[i] = True
                remaining -= caps[i]
            continue
        base = {i: math.floor(ideal[i]) for i in free_idx}
        for i in free_idx:
            counts[i] = base[i]
        left = remaining - sum(base.values())
        # Largest remainder first; ties go to the earlier node (stable, deterministic).
        order = sorted(free_idx, key=lambda i: (-(ideal[i] - base[i]), i))
        for i in order:
            if left <= 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
        remaining = left
        break
    if remaining > 0:  # rounding left some over: give them to whoever still has room
        for i in sorted(range(n), key=lambda i: -weights[i]):
            while remaining > 0 and counts[i] < caps[i]:
                counts[i] += 1
                remaining -= 1
    return counts


SPEED_CLASS_TOLERANCE = 0.3  # speeds within 30% of a class's fastest count as equal


def speed_classes(speeds: Sequence[float], *, tolerance: float = SPEED_CLASS_TOLERANCE) -> list[list[int]]:
    """Group node indices by speed, fastest first; measured speeds are noisy, so nodes
    within `tolerance` of their class's fastest are treated as equally fast."""
    order = sorted(range(len(speeds)), key=lambda i: (-speeds[i], i))
    classes: list[list[int]] = []
    for i in order:
        if classes and speeds[i] >= speeds[classes[-1][0]] * (1 - tolerance):
            classes[-1].append(i)
        else:
            classes.append([i])
    return classes


def _fastest_first(
    speeds: Sequence[float], caps: Sequence[int], rooms: Sequence[float], total: int, output_idx: int
) -> list[int]:
    """Minimise sum(layers_i / speed_i): fill the fastest class first, proportionally to
    room inside a class (equal speeds: any split costs the same; spread like llama.cpp)."""
    counts = [0] * len(speeds)
    remaining = total
    if caps[output_idx] > 0:  # llama.cpp puts the output only on a device that holds a layer
        counts[output_idx] = 1
        remaining -= 1
    for cls in speed_classes(speeds):
        if remaining <= 0:
            break
        left_caps = [caps[i] - counts[i] for i in cls]
        share = _proportional([max(rooms[i], 1.0) for i in cls], left_caps, min(remaining, sum(left_caps)))
        for i, c in zip(cls, share):
            counts[i] += c
            remaining -= c
    return counts


def _allocate(
    nodes: Sequence[NodeCapacity], profile: ModelProfile, n_ctx: int, strategy: Strategy, output_idx: int,
    lanes: int = 1,
) -> list[int] | None:
    caps = [_cap(n, profile, n_ctx, output=(i == output_idx), lanes=lanes) for i, n in enumerate(nodes)]
    if sum(caps) < profile.n_layers:
        return None
    rooms = [float(_room(n, profile, n_ctx, output=(i == output_idx), lanes=lanes)) for i, n in enumerate(nodes)]
    if strategy == "speed":
        return _fastest_first([n.speed for n in nodes], caps, rooms, profile.n_layers, output_idx)
    weights = [
        rooms[i] * (1.0 if strategy == "memory" else max(n.speed, 0.0)) if caps[i] > 0 else 0.0
        for i, n in enumerate(nodes)
    ]
    if sum(weights) <= 0:
        weights = [float(c) for c in caps]
    counts = _proportional(weights, caps, profile.n_layers)
    if counts[output_idx] == 0 and caps[output_idx] > 0:
        # llama.cpp puts the output only on a device that holds a layer: when the output
        # device's share rounds to nothing, it takes one layer from the largest share.
        donor = max(range(len(counts)), key=lambda i: (counts[i], -i))
        counts[donor] -= 1
        counts[output_idx] += 1
    return counts


def _try_plan(
    nodes: Sequence[NodeCapacity], profile: ModelProfile, n_ctx: int, strategy: Strategy, lanes: int = 1
) -> tuple[list[NodeCapacity], list[int], int] | None:
    """Returns (device-ordered nodes, counts, output index) or None if it cannot fit."""
    head = [n for n in nodes if n.is_head][:1]
    workers = [n for n in nodes if not n.is_head]
    if not workers:
        if not head:
            return None
        counts = _allocate(head, profile, n_ctx, strategy, output_idx=0, lanes=lanes)
        return (head, counts, 0) if counts is not None else None
    # The output layer goes to the last RPC device. Try the roomiest worker last first
    # (the fastest, for the speed strategy), so the output lands where it fits best;
    # fall back to the others.
    if strategy == "speed":
        prefs = sorted(range(len(workers)), key=lambda i: (-workers[i].speed, -workers[i].free_bytes, -i))
    else:
        prefs = sorted(range(len(workers)), key=lambda i: (-workers[i].free_bytes, -i))
    found: list[tuple[list[NodeCapacity], list[int], int]] = []
    for last in prefs:
        ordered = head + workers[:last] + workers[last + 1 :] + [workers[last]]
        out_idx = len(ordered) - 1
        counts = _allocate(ordered, profile, n_ctx, strategy, output_idx=out_idx, lanes=lanes)
        # llama.cpp puts the output on the last device that holds a layer: it must hold one.
        if counts is not None and counts[out_idx] > 0:
            if strategy != "speed":
                return ordered, counts, out_idx
            found.append((ordered, counts, out_idx))
    if not found:
        return None
    # Speed: where the output sits changes who has room for what; keep the fastest layout.
    return min(found, key=lambda c: sum(n / max(nd.speed, 1e-9) for nd, n in zip(c[0], c[1])))


def _place(
    nodes: Sequence[NodeCapacity], profile: ModelProfile, n_ctx: int, strategy: Strategy, lanes: int = 1
) -> tuple[tuple[list[NodeCapacity], list[int], int] | None, list[tuple[str, str]]]:
    """The placement (or None if it cannot fit) and the nodes left out, with why."""
    excluded: list[tuple[str, str]] = []
    usable: list[NodeCapacity] = []
    one_layer = _per_layer_bytes(profile, n_ctx)
    for n in nodes:
        reserve, extra = _fixed_bytes(profile, n_ctx, head=n.is_head, output=False, lanes=lanes)
        need = reserve + extra + one_layer
        if n.speed <= 0 and strategy != "memory":
            excluded.append((n.name, "speed weight is 0"))
        elif n.free_bytes < need:
            excluded.append((n.name, f"too small for one layer (needs {fmt_bytes(need)}, has {fmt_bytes(n.free_bytes)})"))
        else:
            usable.append(n)
    return (_try_plan(usable, profile, n_ctx, strategy, lanes) if usable else None), excluded


def make_plan(
    *,
    nodes: Sequence[NodeCapacity],
    profile: ModelProfile,
    n_ctx: int,
    strategy: Strategy = "proportional",
    lanes: int = 1,
) -> Plan:
    """Place every layer of `profile` on `nodes`; raise `PlanError` if it cannot fit."""
    if n_ctx <= 0:
        raise PlanError(f"context size must be positive, got {n_ctx}")
    if strategy not in ("memory", "proportional", "speed"):
        raise PlanError(f"unknown strategy {strategy!r} (use 'memory', 'proportional' or 'speed')")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise PlanError(f"node names must be unique, got {names}")
    if sum(1 for n in nodes if n.is_head) > 1:
        raise PlanError("at most one node can be the head")

    if lanes < 1:
        raise PlanError(f"lanes must be at least 1, got {lanes}")
    result, excluded = _place(nodes, profile, n_ctx, strategy, lanes)
    if result is None:
        raise _no_fit_error(nodes=nodes, profile=profile, n_ctx=n_ctx, strategy=strategy, lanes=lanes)
    ordered, counts, out_idx = result
    return _assemble(ordered, counts, output_node=ordered[out_idx].name, profile=profile, n_ctx=n_ctx,
                     strategy=strategy, excluded=excluded, lanes=lanes)


def _assemble(
    ordered: Sequence[NodeCapacity],
    counts: Sequence[int],
    *,
    output_node: str,
    profile: ModelProfile,
    n_ctx: int,
    strategy: str,
    excluded: list[tuple[str, str]],
    lanes: int = 1,
) -> Plan:
    """The plan for `counts[i]` contiguous layers on `ordered[i]`, in device order."""
    assignments: list[Assignment] = []
    start = 0
    for n, c in zip(ordered, counts):
        if c == 0:
            excluded.append((n.name, "not needed: the others hold every layer"))
            continue
        reserve, extra = _fixed_bytes(profile, n_ctx, head=n.is_head, output=n.name == output_node, lanes=lanes)
        assignments.append(
            Assignment(
                node=n.name,
                endpoint=n.endpoint,
                is_head=n.is_head,
                start=start,
                end=start + c,
                weight_bytes=sum(profile.layer_bytes[start : start + c]),
                kv_bytes=profile.kv_bytes(n_ctx=n_ctx, n_layers=c),
                reserve_bytes=reserve,
                extra_bytes=extra,
                free_bytes=n.free_bytes,
            )
        )
        start += c
    assert start == profile.n_layers
    return Plan(
        assignments=tuple(assignments),
        n_layers=profile.n_layers,
        n_ctx=n_ctx,
        strategy=strategy,
        output_node=output_node,
        excluded=tuple(excluded),
        lanes=lanes,
    )


def replan_without(
    previous: Plan,
    *,
    nodes: Sequence[NodeCapacity],
    profile: ModelProfile,
    n_ctx: int,
    lanes: int = 1,
) -> Plan | None:
    """After losing nodes, the plan that moves the fewest layers: every survivor keeps its
    range and the lost ranges go to their neighbours (the first survivor extends down to
    layer 0, the last up to the output). None when nothing was lost, when it does not fit
    the survivors' memory, or when the model or context changed: then plan afresh.

    Why: each moved layer is weights sent over the network inside the stream gap; with a
    stable assignment, the failover plan for any single node is known in advance, so its
    layers can be staged on the survivors' disks before the failure (appliance.head.staging).
    """
    if previous.n_ctx != n_ctx or previous.n_layers != profile.n_layers or previous.lanes != lanes:
        return None
    by_name = {n.name: n for n in nodes}
    kept = [a for a in previous.assignments if a.node in by_name and a.endpoint == by_name[a.node].endpoint]
    if not kept or len(kept) == len(previous.assignments):
        return None
    order = [by_name[a.node] for a in kept]
    last = len(kept) - 1
    caps = [_cap(n, profile, n_ctx, output=(i == last), lanes=lanes) for i, n in enumerate(order)]
    # Where a gap is split depends only on the previous plan (the memory each node had when
    # it was made), not on free memory now: the failover plan the head pre-stages for is
    # then exactly the plan it moves to, however free memory jittered in between.
    recorded = [NodeCapacity(name=a.node, free_bytes=a.free_bytes, is_head=a.is_head) for a in kept]
    rooms = [float(_room(n, profile, n_ctx, output=(i == last), lanes=lanes)) for i, n in enumerate(recorded)]
    counts = [a.n_layers for a in kept]
    if any(c > cap for c, cap in zip(counts, caps)):
        return None
    # Gaps: below the first survivor, between survivors, above the last.
    counts[0] += kept[0].start
    counts[last] += profile.n_layers - kept[last].end
    for i in range(last):
        gap = kept[i + 1].start - kept[i].end
        if gap == 0:
            continue
        left_free, right_free = caps[i] - counts[i], caps[i + 1] - counts[i + 1]
        if left_free + right_free < gap:
            return None
        # Split by the room each side has left (the planner's own measure of fit).
        share = rooms[i] / max(rooms[i] + rooms[i + 1], 1.0)
        to_left = min(max(round(gap * share), gap - right_free), left_free)
        counts[i] += to_left
        counts[i + 1] += gap - to_left
    if any(c > cap for c, cap in zip(counts, caps)) or sum(counts) != profile.n_layers:
        return None
    gone = [(a.node, "lost: its layers went to its neighbours") for a in previous.assignments if a not in kept]
    return _assemble(order, counts, output_node=order[last].name, profile=profile, n_ctx=n_ctx,
                     strategy=previous.strategy, excluded=gone, lanes=lanes)


def moved_bytes(before: Plan, after: Plan, profile: ModelProfile) -> int:
    """Weights that change node between two plans: what a re-plan sends over the network."""
    owner = {i: a.node for a in before.assignments for i in range(a.start, a.end)}
    moved = sum(
        profile.layer_bytes[i] for a in after.assignments for i in range(a.start, a.end) if owner.get(i) != a.node
    )
    return moved + (profile.output_bytes if after.output_node != before.output_node else 0)


def needed_bytes(*, profile: ModelProfile, n_ctx: int, n_nodes: int, lanes: int = 1) -> int:
    """Total memory the model needs on `n_nodes` devices (each pays its reserve)."""
    reserves = sum(
        compute_reserve_bytes(profile=profile, n_ctx=n_ctx, output=(i == 0), lanes=lanes)
        for i in range(max(n_nodes, 1))
    )
    return (
        profile.layers_total_bytes
        + profile.output_bytes
        + profile.kv_bytes(n_ctx=n_ctx, n_layers=profile.n_layers)
        + reserves
    )


def _fits(nodes: Sequence[NodeCapacity], profile: ModelProfile, n_ctx: int, strategy: Strategy, lanes: int) -> bool:
    """Whether a placement exists (no plan, no error message: cheap enough to search with)."""
    return _place(nodes, profile, n_ctx, strategy, lanes)[0] is not None


def _no_fit_error(
    *, nodes: Sequence[NodeCapacity], profile: ModelProfile, n_ctx: int, strategy: Strategy, lanes: int = 1
) -> PlanError:
    workers = [n for n in nodes if not n.is_head]
    have = sum(n.free_bytes for n in nodes)
    need = needed_bytes(profile=profile, n_ctx=n_ctx, n_nodes=max(len(nodes), 1), lanes=lanes)
    if not nodes:
        return PlanError(
            f"no nodes to place the model on: it needs {fmt_bytes(need)} "
            f"({profile.n_layers} layers at n_ctx={n_ctx}); start workers that join this head",
            needed_bytes=need,
            available_bytes=0,
        )
    hints: list[str] = []
    lo, hi = 1, n_ctx - 1
    best = 0
    while lo <= hi and n_ctx > 1:
        mid = (lo + hi) // 2
        if _fits(nodes, profile, mid, strategy, lanes):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best >= 256:
        hints.append(f"lower the context to {best} tokens or less")
    extra = max(need - have, 0)
    per_node = _per_layer_bytes(profile, n_ctx) + compute_reserve_bytes(
        profile=profile, n_ctx=n_ctx, output=True, lanes=lanes
    )
    hints.append(f"add a node with at least {fmt_bytes(max(extra, per_node))} free")
    if workers:
        hints.append("free memory on the existing nodes")
    return PlanError(
        f"model does not fit: {profile.n_layers} layers at n_ctx={n_ctx} need about {fmt_bytes(need)}, "
        f"the {len(nodes)} node(s) have {fmt_bytes(have)} free; to fix: " + ", or ".join(hints),
        needed_bytes=need,
        available_bytes=have,
    )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns at TiB


def parse_bytes(text: str) -> int:
    """'8G', '512M', '2GiB', '1.5g', '1000000' -> bytes."""
    t = text.strip().lower().replace("ib", "").replace("b", "")
    mult = 1
    if t and t[-1] in "kmgt":
        mult = {"k": 1024, "m": MIB, "g": GIB, "t": 1024 * GIB}[t[-1]]
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (examples: 8G, 512M, 1.5GiB)") from None
    if value < 0:
        raise ValueError(f"memory size must not be negative: {text!r}")
    return int(value * mult)
