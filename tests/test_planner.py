"""Placement planner: a pure function, tested with tables of cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.core.planner import GIB, MIB, NodeCapacity, Plan, PlanError, make_plan, parse_bytes
from appliance.core.profile import ModelProfile

LAYER = 100 * MIB


def model(n_layers: int = 10, *, kv: int = 1024) -> ModelProfile:
    return ModelProfile(
        path="m.gguf",
        file_bytes=n_layers * LAYER + 200 * MIB,
        architecture="llama",
        name="m",
        n_layers=n_layers,
        layer_bytes=(LAYER,) * n_layers,
        input_bytes=50 * MIB,
        output_bytes=50 * MIB,
        kv_bytes_per_token_per_layer=kv,
        context_length=4096,
        embedding_length=1024,
        vocab_size=32000,
        has_chat_template=True,
    )


def W(name: str, free: int, speed: float = 1.0) -> NodeCapacity:
    return NodeCapacity(name=name, free_bytes=free, speed=speed, endpoint=f"10.0.0.{ord(name[-1]) % 200}:50052")


def layers(plan: Plan) -> dict[str, int]:
    return {a.node: a.n_layers for a in plan.assignments if a.n_layers}


@pytest.mark.parametrize(
    "nodes, n_ctx, strategy, expected",
    [
        pytest.param([W("a", 4 * GIB), W("b", 4 * GIB)], 2048, "proportional", {"a": 5, "b": 5}, id="equal-nodes"),
        pytest.param(
            [W("a", 2 * GIB), W("b", 4 * GIB), W("c", 2 * GIB)], 2048, "proportional", {"a": 3, "b": 5, "c": 2},
            id="unequal-memory",
        ),
        pytest.param([W("a", 4 * GIB), W("tiny", 120 * MIB)], 2048, "proportional", {"a": 10}, id="node-too-small-for-a-layer"),
        pytest.param(
            [W("a", 4 * GIB, speed=3.0), W("b", 4 * GIB)], 2048, "proportional", {"a": 8, "b": 2},
            id="speed-weight-proportional",
        ),
        pytest.param(
            [W("fast", 3 * GIB, speed=3.0), W("slow", 4 * GIB, speed=1.0)], 2048, "speed", {"fast": 10},
            id="speed-strategy-fills-fastest",
        ),
        pytest.param(
            [W("fast", 700 * MIB, speed=3.0), W("slow", 4 * GIB, speed=1.0)], 2048, "speed", {"fast": 5, "slow": 5},
            id="speed-strategy-fastest-up-to-memory",
        ),
        pytest.param(
            [W("a", 4 * GIB, speed=10.0), W("b", 4 * GIB, speed=9.0)], 2048, "speed", {"a": 5, "b": 5},
            id="speed-strategy-near-equal-speeds-spread",
        ),
        pytest.param(
            [W("a", 4 * GIB, speed=30.0), W("b", 4 * GIB, speed=29.0), W("slow", 4 * GIB, speed=8.0)], 2048, "speed",
            {"a": 5, "b": 5}, id="speed-strategy-drops-slow-node",
        ),
        pytest.param(
            [NodeCapacity(name="head", free_bytes=1 * GIB, is_head=True), W("a", 4 * GIB)], 2048, "proportional",
            {"head": 2, "a": 8}, id="head-holds-first-layers",
        ),
    ],
)
def test_plan_cases(nodes: list[NodeCapacity], n_ctx: int, strategy: str, expected: dict[str, int]) -> None:
    plan = make_plan(nodes=nodes, profile=model(), n_ctx=n_ctx, strategy=strategy)  # type: ignore[arg-type]
    assert layers(plan) == expected
    # Contiguous ranges covering every layer exactly once, in device order.
    start = 0
    for a in plan.assignments:
        assert a.start == start
        start = a.end
        assert a.total_bytes <= a.free_bytes, f"{a.node} over its memory"
    assert start == 10


def test_tensor_split_matches_llama_cpp_layout() -> None:
    plan = make_plan(nodes=[W("a", 2 * GIB), W("b", 4 * GIB)], profile=model(), n_ctx=2048)
    # llama.cpp counts the output as layer n_layer on the last device.
    rpc = plan.rpc_assignments
    assert plan.tensor_split == [float(rpc[0].n_layers), float(rpc[1].n_layers + 1)]
    assert plan.n_gpu_layers == 11
    assert plan.output_node == rpc[-1].node
    headed = make_plan(
        nodes=[NodeCapacity(name="head", free_bytes=GIB, is_head=True), W("a", 4 * GIB)], profile=model(), n_ctx=2048
    )
    assert headed.n_gpu_layers == 11 - headed.head_layers
    assert headed.tensor_split == [float(headed.rpc_assignments[0].n_layers + 1)]


def test_model_too_big_says_need_have_and_fix() -> None:
    with pytest.raises(PlanError) as exc:
        make_plan(nodes=[W("a", 400 * MIB), W("b", 400 * MIB)], profile=model(), n_ctx=2048)
    msg = str(exc.value)
    assert "does not fit" in msg and "need about" in msg and "have 800.0 MiB free" in msg
    assert "add a node with at least" in msg
    assert exc.value.needed_bytes > exc.value.available_bytes


def test_context_size_changes_the_fit() -> None:
    big_kv = model(kv=64 * 1024)  # 64 KiB per token per layer
    nodes = [W("a", 2 * GIB), W("b", 2 * GIB)]
    make_plan(nodes=nodes, profile=big_kv, n_ctx=1024)
    with pytest.raises(PlanError) as exc:
        make_plan(nodes=nodes, profile=big_kv, n_ctx=8192)
    assert "lower the context to" in str(exc.value)
    small = make_plan(nodes=nodes, profile=big_kv, n_ctx=1024)
    assert sum(a.kv_bytes for a in small.assignments) == 64 * 1024 * 1024 * 10


@pytest.mark.parametrize(
    "nodes, profile, hint",
    [
        pytest.param([W("a", 2 * GIB), W("b", 2 * GIB)], model(kv=64 * 1024), 3989, id="smaller-context-fits"),
        pytest.param([W("a", 400 * MIB), W("b", 400 * MIB)], model(), None, id="no-context-fits"),
    ],
)
def test_no_fit_searches_a_bounded_number_of_placements(
    monkeypatch: pytest.MonkeyPatch, nodes: list[NodeCapacity], profile: ModelProfile, hint: int | None
) -> None:
    """Issue 11, defect 1: the no-fit path used to recurse (`_no_fit_error` -> `_fits` ->
    `make_plan` -> `_no_fit_error` ...): 386 placements for the first case, 8,191 for the
    second. The hint's binary search over n_ctx now tries one placement per probe."""
    from appliance.core import planner

    calls = 0
    try_plan = planner._try_plan

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return try_plan(*args, **kwargs)

    monkeypatch.setattr(planner, "_try_plan", counting)
    with pytest.raises(PlanError) as exc:
        make_plan(nodes=nodes, profile=profile, n_ctx=8192)
    assert 1 <= calls <= 64, f"{calls} placement attempts for one failing plan"
    msg = str(exc.value)
    assert "does not fit" in msg and "add a node with at least" in msg
    if hint is None:
        assert "lower the context" not in msg
    else:
        # The hint is the largest context that fits, and it does fit.
        assert f"lower the context to {hint} tokens or less" in msg
        monkeypatch.setattr(planner, "_try_plan", try_plan)
        make_plan(nodes=nodes, profile=profile, n_ctx=hint)
        with pytest.raises(PlanError):
            make_plan(nodes=nodes, profile=profile, n_ctx=hint + 1)


def test_no_nodes() -> None:
    with pytest.raises(PlanError, match="no nodes"):
        make_plan(nodes=[], profile=model(), n_ctx=2048)


def test_plan_is_deterministic_and_roundtrips() -> None:
    nodes = [W("a", 3 * GIB), W("b", 5 * GIB), W("c", 1 * GIB)]
    p1 = make_plan(nodes=nodes, profile=model(), n_ctx=2048)
    p2 = make_plan(nodes=nodes, profile=model(), n_ctx=2048)
    assert p1 == p2 and p1.key() == p2.key()
    assert Plan.from_dict(json.loads(json.dumps(p1.to_dict()))).key() == p1.key()


@pytest.mark.parametrize(
    "speeds, classes",
    [
        pytest.param([10.0, 9.0, 3.0], [[0, 1], [2]], id="two-classes"),
        pytest.param([1.0, 1.0, 1.0], [[0, 1, 2]], id="all-equal"),
        pytest.param([3.0, 10.0, 6.0], [[1], [2], [0]], id="three-classes"),
    ],
)
def test_speed_classes(speeds: list[float], classes: list[list[int]]) -> None:
    from appliance.core.planner import speed_classes

    assert speed_classes(speeds) == classes


def test_speed_plan_beats_memory_plan_on_slow_node() -> None:
    """A 3x slower node: the speed plan's per-token cost is lower than the memory plan's."""
    nodes = [W("fast", 4 * GIB, speed=3.0), W("slow", 4 * GIB, speed=1.0)]
    mem = make_plan(nodes=nodes, profile=model(), n_ctx=2048, strategy="proportional")
    fast = make_plan(nodes=nodes, profile=model(), n_ctx=2048, strategy="speed")
    speeds = {"fast": 3.0, "slow": 1.0}
    assert fast.time_per_token(speeds) < mem.time_per_token(speeds) / 1.2


@pytest.mark.parametrize(
    "text, value",
    [("8G", 8 * GIB), ("512M", 512 * MIB), ("1.5GiB", int(1.5 * GIB)), ("1000", 1000), ("2gb", 2 * GIB)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_cli_plan(demo_model: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "appliance", "plan", str(demo_model), "--node", "a=1G", "--node", "b=2G:2", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert sum(a["n_layers"] for a in plan["assignments"]) == 30
    res = subprocess.run(
        [sys.executable, "-m", "appliance", "plan", str(demo_model), "--node", "a=100M"],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2 and "does not fit" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------- stable re-plans
def ranges(plan: Plan) -> dict[str, tuple[int, int]]:
    return {a.node: (a.start, a.end) for a in plan.assignments}


def moved_layers(before: Plan, after: Plan) -> set[int]:
    """Layers whose node changed: what a re-plan sends over the network."""
    owner = {i: a.node for a in before.assignments for i in range(a.start, a.end)}
    return {i for a in after.assignments for i in range(a.start, a.end) if owner.get(i) != a.node}


THREE = [W("w1", 4 * GIB), W("w2", 4 * GIB), W("w3", 4 * GIB)]


@pytest.mark.parametrize(
    "lost, survivors_keep",
    [
        pytest.param("w1", {"w2", "w3"}, id="first-node"),
        pytest.param("w2", {"w1", "w3"}, id="middle-node"),
        pytest.param("w3", {"w1", "w2"}, id="last-node-output-moves"),
    ],
)
def test_losing_a_node_moves_only_its_layers(lost: str, survivors_keep: set[str]) -> None:
    from appliance.core.planner import replan_without

    prof = model(12)
    before = make_plan(nodes=THREE, profile=prof, n_ctx=2048)
    lost_layers = set(range(*ranges(before)[lost]))
    after = replan_without(before, nodes=[n for n in THREE if n.name != lost], profile=prof, n_ctx=2048)
    assert after is not None
    assert {a.node for a in after.assignments} == survivors_keep
    assert moved_layers(before, after) == lost_layers  # nothing else moves
    for name in survivors_keep:  # every survivor keeps its range and grows it
        (s0, e0), (s1, e1) = ranges(before)[name], ranges(after)[name]
        assert s1 <= s0 and e1 >= e0
    assert after.output_node == after.assignments[-1].node
    assert sum(a.n_layers for a in after.assignments) == prof.n_layers


def test_a_fresh_plan_after_the_same_loss_would_move_more() -> None:
    """Why the stable re-plan exists: planning from scratch shuffles the survivors too."""
    from appliance.core.planner import replan_without

    prof = model(12)
    four = [*THREE, W("w4", 4 * GIB)]
    before = make_plan(nodes=four, profile=prof, n_ctx=2048)
    survivors = [n for n in four if n.name != "w2"]
    fresh = make_plan(nodes=survivors, profile=prof, n_ctx=2048)
    stable = replan_without(before, nodes=survivors, profile=prof, n_ctx=2048)
    assert stable is not None and len(moved_layers(before, stable)) < len(moved_layers(before, fresh))


@pytest.mark.parametrize(
    "survivors, n_ctx, why",
    [
        pytest.param([W("w1", 4 * GIB), W("w2", 4 * GIB), W("w3", 4 * GIB)], 2048, "nothing lost", id="nothing-lost"),
        pytest.param([W("w1", 700 * MIB), W("w3", 700 * MIB)], 2048, "too small", id="survivors-too-small"),
        pytest.param([W("w1", 4 * GIB), W("w3", 4 * GIB)], 4096, "context changed", id="context-changed"),
    ],
)
def test_stable_replan_declines_when_a_fresh_plan_is_needed(survivors, n_ctx: int, why: str) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.planner import replan_without

    prof = model(12)
    before = make_plan(nodes=THREE, profile=prof, n_ctx=2048)
    assert replan_without(before, nodes=survivors, profile=prof, n_ctx=n_ctx) is None, why
