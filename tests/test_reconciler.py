"""The stabilization core as pure functions: desired state and reconcile, tested by tables."""

from __future__ import annotations

import pytest

from appliance.common.config import Timing
from appliance.core.planner import GIB, MIB
from appliance.core.profile import ModelProfile
from appliance.core.reconciler import (
    Desired,
    EngineView,
    NodeView,
    StartEngine,
    StopEngine,
    Wait,
    desired_state,
    reconcile,
)

T = Timing().engine
PROFILE = ModelProfile(
    path="m.gguf", file_bytes=1, architecture="llama", name="m", n_layers=10, layer_bytes=(100 * MIB,) * 10,
    input_bytes=50 * MIB, output_bytes=50 * MIB, kv_bytes_per_token_per_layer=1024, context_length=4096,
    embedding_length=1024, vocab_size=32000, has_chat_template=True,
)


def node(name: str, state: str = "alive", *, mem: int = 4 * GIB, cordoned: bool = False, ready: bool = True,
         port: int = 0, age: float = 100.0, rpc_down: float = 0.0, refused: bool = False,
         stalled: bool = False) -> NodeView:
    return NodeView(name=name, endpoint=f"10.0.0.1:{port or 50000 + int(name[1:])}", state=state, rpc_ready=ready,
                    cordoned=cordoned, plannable_bytes=mem, state_age_s=age, rpc_down_s=rpc_down, rpc_refused=refused,
                    stalled_engine=stalled)


def plan_over(*names: str, mems: dict[str, int] | None = None):  # type: ignore[no-untyped-def]
    d = desired_state(nodes=[node(n, mem=(mems or {}).get(n, 4 * GIB)) for n in names], profile=PROFILE, n_ctx=2048)
    assert d.plan is not None
    return d


def names(d: Desired) -> list[str]:
    assert d.plan is not None
    return [a.node for a in d.plan.assignments if a.n_layers]


@pytest.mark.parametrize(
    "nodes, current, expect_nodes, expect_hold, expect_degraded",
    [
        pytest.param([node("w1"), node("w2")], None, ["w1", "w2"], "", "", id="fresh-start-two-nodes"),
        pytest.param([node("w1"), node("w2", "joining", age=0.5)], None, None, "waiting for w2", "", id="startup-gathers-joining"),
        pytest.param([node("w1"), node("w2", "joining", age=60)], None, ["w1"], "", "", id="startup-stops-waiting-for-stuck-join"),
        pytest.param([node("w1"), node("w2", "dead")], ("w1", "w2"), ["w1"], "", "", id="dead-node-replans"),
        pytest.param([node("w1"), node("w2", "suspect")], ("w1", "w2"), ["w1", "w2"], "waiting for w2", "", id="suspect-holds-plan"),
        pytest.param([node("w1"), node("w2", "joining")], ("w1", "w2"), ["w1", "w2"], "waiting for w2", "", id="rejoining-plan-node-holds"),
        pytest.param([node("w1"), node("w2", cordoned=True)], ("w1", "w2"), ["w1"], "", "", id="drained-node-leaves-plan"),
        pytest.param([node("w1"), node("w2", ready=False, rpc_down=1.0)], ("w1", "w2"), ["w1", "w2"], "waiting for w2", "", id="rpc-blip-holds"),
        pytest.param([node("w1"), node("w2", ready=False, rpc_down=30.0)], ("w1", "w2"), ["w1"], "", "", id="rpc-down-too-long-replans"),
        pytest.param([node("w1"), node("w2", "suspect", ready=False, refused=True)], ("w1", "w2"), ["w1"], "", "", id="rpc-refused-replans-at-once"),
        pytest.param([node("w1"), node("w2", ready=True, refused=True)], ("w1", "w2"), ["w1"], "", "", id="refused-despite-heartbeats-replans"),
        pytest.param([node("w1"), node("w2", ready=True, refused=True)], ("w1",), ["w1"], "", "", id="refused-node-not-taken-back"),
        pytest.param([node("w1"), node("w2", "suspect", stalled=True)], ("w1", "w2"), ["w1"], "", "", id="suspect-that-stalled-the-engine-replans"),
        pytest.param([node("w1"), node("w2", "alive", stalled=True)], ("w1", "w2"), ["w1", "w2"], "", "", id="stall-blame-ends-when-it-answers"),
        pytest.param([node("w1"), node("w2"), node("w3")], ("w1", "w2"), ["w1", "w3", "w2"], "", "", id="new-node-joins-plan"),
        pytest.param([node("w1"), node("w2"), node("w3", "joining", age=0.3)], ("w1", "w2"), ["w1", "w2"], "", "", id="joining-node-not-yet"),
        pytest.param([node("w1", mem=300 * MIB), node("w2", "dead")], ("w1", "w2"), None, "", "does not fit", id="survivors-too-small-degraded"),
        pytest.param([], None, None, "", "no worker is ready", id="no-workers"),
        pytest.param([node("w1", "dead"), node("w2", "dead")], ("w1", "w2"), None, "", "no worker is ready", id="all-dead"),
    ],
)
def test_desired_state(nodes, current, expect_nodes, expect_hold, expect_degraded) -> None:  # type: ignore[no-untyped-def]
    cur = plan_over(*current) if current else None
    d = desired_state(
        nodes=nodes, profile=PROFILE, n_ctx=2048,
        current=cur.plan if cur else None, current_considered=cur.considered if cur else frozenset(),
    )
    assert_desired(d, expect_nodes, expect_hold, expect_degraded)


def assert_desired(d: Desired, expect_nodes, expect_hold, expect_degraded) -> None:  # type: ignore[no-untyped-def]
    if expect_nodes is None:
        assert d.plan is None
    else:
        assert sorted(names(d)) == sorted(expect_nodes)
    assert expect_hold in d.hold if expect_hold else d.hold == ""
    assert expect_degraded in d.degraded if expect_degraded else d.degraded == ""


def test_memory_jitter_does_not_replan() -> None:
    cur = plan_over("w1", "w2")
    jittered = [node("w1", mem=4 * GIB - 37 * MIB), node("w2", mem=4 * GIB + 12 * MIB)]
    d = desired_state(nodes=jittered, profile=PROFILE, n_ctx=2048, current=cur.plan, current_considered=cur.considered)
    assert d.plan is cur.plan


def test_rejoined_node_is_taken_back_in() -> None:
    cur = plan_over("w1")  # w2 was dead when this plan was made
    d = desired_state(nodes=[node("w1"), node("w2")], profile=PROFILE, n_ctx=2048,
                      current=cur.plan, current_considered=cur.considered)
    assert sorted(names(d)) == ["w1", "w2"]


def test_force_replan() -> None:
    cur = plan_over("w1", "w2")
    d = desired_state(nodes=[node("w1"), node("w2")], profile=PROFILE, n_ctx=2048, current=cur.plan,
                      current_considered=cur.considered, force_replan=True)
    assert d.plan is not None and d.plan.key() == cur.plan.key()


PLAN2 = plan_over("w1", "w2")
PLAN1 = plan_over("w1")


@pytest.mark.parametrize(
    "desired, engine, allowed, expect",
    [
        pytest.param(PLAN2, EngineView(state="stopped"), True, StartEngine, id="start-when-stopped"),
        pytest.param(PLAN2, EngineView(state="failed", plan=PLAN2.plan), True, StartEngine, id="restart-after-crash"),
        pytest.param(PLAN2, EngineView(state="failed", plan=PLAN2.plan), False, Wait, id="crash-loop-backoff"),
        pytest.param(PLAN1, EngineView(state="serving", plan=PLAN2.plan), True, StopEngine, id="replan-stops-old-engine"),
        pytest.param(PLAN1, EngineView(state="loading", plan=PLAN2.plan, started_at=0), True, StopEngine, id="replan-while-loading"),
        pytest.param(PLAN2, EngineView(state="stopping", plan=PLAN2.plan), True, Wait, id="wait-while-stopping"),
        pytest.param(Desired(plan=None, degraded="model does not fit"), EngineView(state="serving", plan=PLAN2.plan), True, StopEngine, id="degraded-stops-engine"),
        pytest.param(Desired(plan=None, degraded="model does not fit"), EngineView(state="failed"), True, Wait, id="degraded-waits"),
        pytest.param(Desired(plan=None, hold="waiting for w2 to finish joining"), EngineView(state="stopped"), True, Wait, id="gathering-waits"),
        pytest.param(Desired(plan=PLAN2.plan, considered=PLAN2.considered, hold="waiting for w2 (suspect)"), EngineView(state="failed", plan=PLAN2.plan), True, Wait, id="suspect-node-delays-restart"),
        pytest.param(PLAN2, EngineView(state="loading", plan=PLAN2.plan, started_at=0.0), True, StopEngine, id="load-timeout"),
        pytest.param(PLAN2, EngineView(state="serving", plan=PLAN2.plan, busy=True, last_progress_at=0.0), True, StopEngine, id="stalled-engine"),
    ],
)
def test_reconcile(desired: Desired, engine: EngineView, allowed: bool, expect: type) -> None:
    now = 10_000.0
    if engine.state == "loading" and engine.plan is PLAN2.plan and desired is PLAN2:
        now = T.ENGINE_LOAD_TIMEOUT_S + 1
    actions = reconcile(desired=desired, engine=engine, restart_allowed=allowed, timing=T, now=now)
    assert len(actions) == 1 and isinstance(actions[0], expect)
    if isinstance(actions[0], StartEngine):
        assert actions[0].plan is desired.plan


@pytest.mark.parametrize(
    "nodes",
    [
        pytest.param(["w1", "w2"], id="two"),
        pytest.param(["w1", "w2", "w3"], id="three"),
        pytest.param(["w1"], id="one"),
    ],
)
def test_converged_state_yields_no_action(nodes: list[str]) -> None:
    """Idempotence: once the engine serves the desired plan, reconciling again does nothing."""
    views = [node(n) for n in nodes]
    d = desired_state(nodes=views, profile=PROFILE, n_ctx=2048)
    assert d.plan is not None
    engine = EngineView(state="serving", plan=d.plan, considered=d.considered, last_progress_at=5.0)
    for t in (5.0, 6.0, 100.0):
        again = desired_state(nodes=views, profile=PROFILE, n_ctx=2048, current=d.plan, current_considered=d.considered)
        assert again.plan is d.plan
        assert reconcile(desired=again, engine=engine, restart_allowed=True, timing=T, now=t) == []


def test_converges_from_any_state_by_repeated_steps() -> None:
    """Simulate the loop: whatever the engine is doing, executing actions reaches serving the plan."""
    views = [node("w1"), node("w2")]
    for start in ("stopped", "failed", "serving-old", "loading-old"):
        if start == "serving-old":
            eng = EngineView(state="serving", plan=PLAN1.plan)
        elif start == "loading-old":
            eng = EngineView(state="loading", plan=PLAN1.plan, started_at=9_999.0)
        else:
            eng = EngineView(state=start)  # type: ignore[arg-type]
        current = eng.plan
        for _ in range(5):
            d = desired_state(nodes=views, profile=PROFILE, n_ctx=2048, current=current,
                              current_considered=frozenset({"w1"}) if current else frozenset())
            acts = reconcile(desired=d, engine=eng, restart_allowed=True, timing=T, now=10_000.0)
            if not acts:
                break
            a = acts[0]
            if isinstance(a, StopEngine):
                eng = EngineView(state="stopped", plan=eng.plan)
            elif isinstance(a, StartEngine):
                eng = EngineView(state="serving", plan=a.plan, considered=a.considered, last_progress_at=10_000.0)
                current = a.plan
        assert eng.state == "serving" and sorted(x.node for x in eng.plan.rpc_assignments) == ["w1", "w2"], start


def test_crash_loop_guard_backs_off_the_same_layout_but_not_a_new_one() -> None:
    from appliance.core.crashloop import CrashLoopGuard

    g = CrashLoopGuard(window_s=60, max_starts=3, backoff_min_s=0.5, backoff_max_s=30)
    g.record_start(0.0)
    g.record_failure(1.0)
    assert not g.allow(1.1)  # same layout: wait out the backoff
    assert g.allow(1.1, ignore_backoff=True)  # the cluster changed: a new layout may start now
    assert g.allow(1.6)
    g.record_start(1.6)
    g.record_failure(2.0)
    assert not g.allow(2.9) and g.allow(3.1)  # backoff doubled
    g.record_start(3.1)
    assert not g.allow(50.0, ignore_backoff=True)  # the cap per window holds for every start
    assert g.allow(65.0, ignore_backoff=True)
