"""Properties of the pure core (planner, reconciler, membership), checked with Hypothesis.

The table tests (test_planner.py, test_reconciler.py, test_membership.py) pin chosen
cases; these state what must hold for every input:

* planner: a returned plan places every layer once, contiguously, within each node's
  memory, with `tensor_split`/`n_gpu_layers` that make llama.cpp load exactly those
  ranges; a plan survives losing a node while what is left still holds the model;
* reconciler: any sequence of membership events, once it stops, converges in a few
  loop steps to serving the plan over the usable nodes (or to waiting, degraded, when
  they cannot hold the model), and a converged state yields no action;
* membership: ALIVE -> DEAD goes through SUSPECT unless one tick comes after more than
  DEAD_AFTER_S of silence, and a node that heartbeats in time is never suspect.

Each defect these properties found is fixed and its minimal counterexample kept as an
explicit @example: a head short of memory was planned over it; the memory and
proportional strategies found no plan when the output device's share rounded to zero
layers; the loop re-planned from live free memory after a usable node got no layers
(jitter reloaded the model); a JOINING node that went silent was promoted to ALIVE.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from appliance.common.config import Timing
from appliance.common.kinds import EngineState
from appliance.common.protocol import PROTOCOL_MAJOR
from appliance.core.membership import Membership, NodeState
from appliance.core.planner import (
    GIB,
    MIB,
    NodeCapacity,
    Plan,
    PlanError,
    compute_reserve_bytes,
    make_plan,
    needed_bytes,
)
from appliance.core.profile import ModelProfile
from appliance.core.reconciler import (
    Adopt,
    Desired,
    EngineView,
    NodeView,
    StartEngine,
    StopEngine,
    Wait,
    WaitKind,
    desired_state,
    reconcile,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STRATEGIES = ("memory", "proportional", "speed")

# ----------------------------------------------------------------------------- planner


def profile_of(
    layer_bytes: tuple[int, ...],
    *,
    input_bytes: int = 0,
    output_bytes: int = 0,
    kv: int = 0,
    embd: int = 0,
    vocab: int = 0,
) -> ModelProfile:
    return ModelProfile(
        path="m.gguf",
        file_bytes=sum(layer_bytes) + input_bytes + output_bytes,
        architecture="llama",
        name="m",
        n_layers=len(layer_bytes),
        layer_bytes=layer_bytes,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        kv_bytes_per_token_per_layer=kv,
        context_length=4096,
        embedding_length=embd,
        vocab_size=vocab,
        has_chat_template=True,
    )


@st.composite
def profiles(draw: st.DrawFn) -> ModelProfile:
    n = draw(st.integers(1, 40))
    if draw(st.booleans()):
        layer_bytes = (draw(st.integers(1, 512)) * MIB,) * n
    else:
        layer_bytes = tuple(draw(st.lists(st.integers(1, 512 * MIB), min_size=n, max_size=n)))
    return profile_of(
        layer_bytes,
        input_bytes=draw(st.integers(0, 512 * MIB)),
        output_bytes=draw(st.integers(0, 1024 * MIB)),
        kv=draw(st.sampled_from([0, 1024, 16 * 1024, 128 * 1024])),
        embd=draw(st.sampled_from([0, 64, 1024, 4096, 8192])),
        vocab=draw(st.sampled_from([0, 1000, 32000, 151936])),
    )


POSITIVE_SPEEDS = st.sampled_from([0.1, 0.5, 0.8, 1.0, 1.0, 1.3, 3.0, 10.0])
SPEEDS = st.one_of(st.just(0.0), POSITIVE_SPEEDS)


@st.composite
def placements(draw: st.DrawFn, *, head: bool | None = None):  # type: ignore[no-untyped-def]
    """(nodes, profile, n_ctx, strategy): each node's memory a share (0-150%) of what the
    model needs on one node, so that plans that fit, fit barely and do not fit are all drawn."""
    profile = draw(profiles())
    n_ctx = draw(st.sampled_from([1, 256, 2048, 8192]))
    need = needed_bytes(profile=profile, n_ctx=n_ctx, n_nodes=1)
    memory = st.integers(0, 150).map(lambda pct: need * pct // 100)
    with_head = head if head is not None else draw(st.booleans())
    frees = draw(st.lists(memory, min_size=0 if with_head else 1, max_size=6))
    nodes = [
        NodeCapacity(name=f"w{i}", free_bytes=f, speed=draw(SPEEDS), endpoint=f"10.0.0.{i + 1}:50052")
        for i, f in enumerate(frees)
    ]
    if with_head:
        nodes.insert(draw(st.integers(0, len(nodes))), NodeCapacity(name="head", free_bytes=draw(memory), is_head=True))
    return nodes, profile, n_ctx, draw(st.sampled_from(STRATEGIES))


def llama_cpp_devices(plan: Plan) -> list[int | None]:
    """Where llama.cpp puts each of the n_layer + 1 layers (the output is layer n_layer) for
    the plan's n_gpu_layers and tensor_split: None is the head's CPU, i the i-th RPC device
    (planner.py's docstring, from llama-model.cpp load_tensors)."""
    n_gpu = plan.n_gpu_layers
    cpu_layers = plan.n_layers + 1 - n_gpu
    split = plan.tensor_split
    cumulative = [c / sum(split) for c in accumulate(split)] if split else []
    return [
        None if il < cpu_layers else bisect.bisect_right(cumulative, (il - cpu_layers) / n_gpu)
        for il in range(plan.n_layers + 1)
    ]


def fits(nodes: list[NodeCapacity], profile: ModelProfile, n_ctx: int, strategy: str) -> Plan | None:
    try:
        return make_plan(nodes=nodes, profile=profile, n_ctx=n_ctx, strategy=strategy)  # type: ignore[arg-type]
    except PlanError:
        return None


@FAST
@given(placements())
def test_a_plan_places_every_layer_once_within_memory(case) -> None:  # type: ignore[no-untyped-def]
    nodes, profile, n_ctx, strategy = case
    try:
        plan = make_plan(nodes=nodes, profile=profile, n_ctx=n_ctx, strategy=strategy)
    except PlanError as exc:
        event("no plan")
        assert exc.available_bytes == sum(n.free_bytes for n in nodes)
        if nodes:
            assert "does not fit" in str(exc)
            assert exc.needed_bytes == needed_bytes(profile=profile, n_ctx=n_ctx, n_nodes=len(nodes))
        return
    event(f"plan over {len(plan.rpc_assignments)} worker(s)" + (" and the head" if plan.head_layers else ""))
    by_name = {n.name: n for n in nodes}
    a = plan.assignments
    # Every layer exactly once, in contiguous ranges, in device order (head first).
    assert [x.start for x in a] == [0] + [x.end for x in a[:-1]]
    assert a[-1].end == profile.n_layers == plan.n_layers
    assert all(x.n_layers >= 1 for x in a if not x.is_head)
    assert [x.is_head for x in a] == sorted((x.is_head for x in a), reverse=True)
    # Each node at most once, each either placed or excluded with a reason, never both.
    placed = [x.node for x in a]
    excluded = [name for name, _ in plan.excluded]
    assert sorted(placed + excluded) == sorted(by_name)
    # What each range costs, and that it fits the node.
    for x in a:
        node = by_name[x.node]
        output = x.node == plan.output_node
        assert (x.endpoint, x.is_head, x.free_bytes) == (node.endpoint, node.is_head, node.free_bytes)
        assert x.weight_bytes == sum(profile.layer_bytes[x.start : x.end])
        assert x.kv_bytes == profile.kv_bytes_per_token_per_layer * n_ctx * x.n_layers
        assert x.reserve_bytes == compute_reserve_bytes(profile=profile, n_ctx=n_ctx, output=output)
        assert x.extra_bytes == (profile.input_bytes if x.is_head else 0) + (profile.output_bytes if output else 0)
        if not x.is_head:
            assert x.total_bytes <= x.free_bytes, f"{x.node} over its memory"
        if strategy != "memory":
            assert node.speed > 0
    head_input = profile.input_bytes if any(x.is_head for x in a) else 0
    assert sum(x.total_bytes for x in a) == needed_bytes(profile=profile, n_ctx=n_ctx, n_nodes=len(a)) + head_input
    # tensor_split / n_gpu_layers make llama.cpp load exactly these ranges, the output on the
    # last RPC device (or on the head's CPU when there is no worker).
    rpc = plan.rpc_assignments
    expected: list[int | None] = [None] * plan.head_layers
    for i, x in enumerate(rpc):
        expected += [i] * x.n_layers
    expected.append(len(rpc) - 1 if rpc else None)
    assert llama_cpp_devices(plan) == expected
    assert plan.output_node == (rpc[-1].node if rpc else a[0].node)
    assert plan.rpc_endpoints == [x.endpoint for x in rpc]
    assert plan.n_gpu_layers == (profile.n_layers + 1 - plan.head_layers if rpc else 0)
    assert sum(plan.tensor_split) == plan.n_gpu_layers
    assert Plan.from_dict(plan.to_dict()) == plan


@FAST
@given(placements(head=True))
@example((
    [NodeCapacity(name="head", free_bytes=0, is_head=True), NodeCapacity(name="w0", free_bytes=GIB, endpoint="10.0.0.1:50052")],
    profile_of((MIB,)), 1, "proportional",
))
def test_the_head_is_within_its_memory_too(case) -> None:  # type: ignore[no-untyped-def]
    nodes, profile, n_ctx, strategy = case
    plan = fits(nodes, profile, n_ctx, strategy)
    assume(plan is not None)
    assert plan is not None
    for x in plan.assignments:
        assert x.total_bytes <= x.free_bytes, f"{x.node}: {x.total_bytes} > {x.free_bytes}"


@FAST
@given(placements())
def test_the_lower_context_hint_fits(case) -> None:  # type: ignore[no-untyped-def]
    nodes, profile, n_ctx, strategy = case
    try:
        make_plan(nodes=nodes, profile=profile, n_ctx=n_ctx, strategy=strategy)
        return
    except PlanError as exc:
        msg = str(exc)
    if "lower the context to " in msg:
        event("lower-context hint")
        hint = int(msg.split("lower the context to ", 1)[1].split()[0])
        assert 256 <= hint < n_ctx
        assert fits(nodes, profile, hint, strategy) is not None


@st.composite
def node_losses(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    """Workers, the index of one that is lost, the model and the context."""
    nodes, profile, n_ctx, _ = draw(placements(head=False))
    return nodes, draw(st.integers(0, len(nodes) - 1)), profile, n_ctx


# The minimal counterexample Hypothesis finds: a 1-layer model and workers of 50, 50 and
# 60 MiB; each holds the model alone, the three hold it, the two of 50 MiB do not.
_ONE_LAYER_THREE_WORKERS = (
    [NodeCapacity(name=f"w{i}", free_bytes=f * MIB, endpoint=f"10.0.0.{i + 1}:50052") for i, f in enumerate((50, 50, 60))],
    2, profile_of((MIB,)), 1,
)


@pytest.mark.parametrize("strategy", ["memory", "proportional", "speed"])
@settings(FAST, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(node_losses())
@example(_ONE_LAYER_THREE_WORKERS)
def test_a_plan_survives_losing_a_node_while_a_remaining_worker_could_hold_everything(  # type: ignore[no-untyped-def]
    strategy: str, loss
) -> None:
    """n-1 nodes still get a plan whenever the memory left suffices, stated conservatively:
    one of the remaining workers could hold the whole model alone."""
    nodes, gone, profile, n_ctx = loss
    assume(fits(nodes, profile, n_ctx, strategy) is not None)
    rest = nodes[:gone] + nodes[gone + 1 :]
    holds_alone = any(fits([n], profile, n_ctx, strategy) is not None for n in rest)
    event(f"a remaining worker holds the model alone: {holds_alone}")
    if holds_alone:
        assert fits(rest, profile, n_ctx, strategy) is not None, f"no plan over {[n.name for n in rest]}"


# -------------------------------------------------------------------------- reconciler

ENGINE_T = Timing().engine
GRACE_S = 5.0
JOIN_WAIT_S = 10.0
STEP_S = 1.0
RECONCILER_PROFILE = profile_of((100 * MIB,) * 12, input_bytes=50 * MIB, output_bytes=50 * MIB, kv=1024, embd=1024, vocab=32000)
N_CTX = 2048


@dataclass
class SimNode:
    """A member as the head's membership holds it; `view()` is what the reconciler sees."""

    name: str
    memory: int
    state: str = "alive"
    rpc_ready: bool = True
    cordoned: bool = False
    refused: bool = False
    stalled: bool = False
    since: float = 0.0
    rpc_down_since: float | None = None

    def view(self, now: float) -> NodeView:
        return NodeView(
            name=self.name, endpoint=f"10.0.0.{self.name[1:]}:50052", state=self.state, rpc_ready=self.rpc_ready,
            cordoned=self.cordoned, plannable_bytes=self.memory, state_age_s=now - self.since,
            rpc_down_s=now - self.rpc_down_since if self.rpc_down_since is not None and not self.rpc_ready else 0.0,
            rpc_refused=self.refused, stalled_engine=self.stalled,
        )

    def set_state(self, state: str, now: float) -> None:
        if state != self.state:
            self.state, self.since = state, now

    def set_rpc(self, ready: bool, now: float) -> None:
        if ready != self.rpc_ready:
            self.rpc_ready = ready
            self.rpc_down_since = None if ready else now


EVENTS = ("die", "leave", "suspect", "recover", "rejoin", "settle", "cordon", "uncordon", "rpc_down", "rpc_up",
          "refused", "reachable", "blame_stall", "engine_crash", "busy", "idle", "wait")


def apply_event(what: str, node: SimNode, now: float, engine: dict) -> None:  # type: ignore[type-arg]
    """One membership event, as membership.py would record it (or one on the engine's side;
    "wait" only lets time pass)."""
    live = node.state in ("alive", "joining", "suspect")
    if what == "die" and live:
        node.set_state("dead", now)
        node.set_rpc(False, now)
    elif what == "leave" and node.state != "left":
        node.set_state("left", now)
        node.set_rpc(False, now)
    elif what == "suspect" and node.state == "alive":
        node.set_state("suspect", now)
    elif what == "recover" and node.state == "suspect":  # a heartbeat
        node.set_state("alive", now)
        node.stalled = False
    elif what == "rejoin" and node.state in ("dead", "left"):
        node.set_state("joining", now)
        node.set_rpc(True, now)
        node.refused = node.stalled = False
    elif what == "settle" and node.state == "joining" and node.rpc_ready:
        node.set_state("alive", now)
    elif what == "cordon":
        node.cordoned = True
    elif what == "uncordon":
        node.cordoned = False
    elif what == "rpc_down" and live:
        node.set_rpc(False, now)
    elif what == "rpc_up" and live:
        node.set_rpc(True, now)
    elif what == "refused" and live:  # mark_unreachable(refused=True)
        node.set_state("suspect", now)
        node.set_rpc(False, now)
        node.refused = True
    elif what == "reachable":
        node.refused = False
    elif what == "blame_stall" and node.state == "suspect":
        node.stalled = True
    elif what == "engine_crash" and engine["state"] in (EngineState.LOADING, EngineState.SERVING):
        engine["state"] = EngineState.FAILED
    elif what == "busy":
        engine["busy"] = True
    elif what == "idle":
        engine["busy"] = False


def loop_step(nodes: list[SimNode], engine: dict, now: float) -> tuple[Desired, list]:  # type: ignore[type-arg]
    """One pass of the head's reconcile loop on a simulated engine; returns what it decided."""
    views = [n.view(now) for n in nodes]
    defer = engine["state"] in (EngineState.STARTING, EngineState.LOADING) or (
        engine["state"] == EngineState.SERVING and engine["busy"]
    )
    desired = desired_state(
        nodes=views, profile=RECONCILER_PROFILE, n_ctx=N_CTX, current=engine["plan"],
        current_considered=engine["considered"], defer_growth=defer, join_wait_s=JOIN_WAIT_S, rpc_grace_s=GRACE_S,
    )
    view = EngineView(state=engine["state"], plan=engine["plan"], considered=engine["considered"],
                      started_at=engine["started_at"], last_progress_at=now, busy=engine["busy"])
    actions = reconcile(desired=desired, engine=view, restart_allowed=True, timing=ENGINE_T, now=now)
    for action in actions:
        if isinstance(action, StopEngine):
            engine["state"] = EngineState.STOPPED
        elif isinstance(action, StartEngine):
            engine.update(state=EngineState.LOADING, plan=action.plan, considered=action.considered, started_at=now)
        elif isinstance(action, Adopt):
            engine["considered"] = action.considered
    # The engine process: a load finishes when every planned worker answers, else it fails.
    if engine["state"] == EngineState.LOADING and not actions_started(actions):
        by_name = {n.name: n for n in nodes}
        ok = all(by_name[a.node].view(now).usable for a in engine["plan"].rpc_assignments)
        engine["state"] = EngineState.SERVING if ok else EngineState.FAILED
    return desired, actions


def actions_started(actions: list) -> bool:  # type: ignore[type-arg]
    return any(isinstance(a, StartEngine) for a in actions)


@st.composite
def event_runs(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    k = draw(st.integers(1, 4))
    memories = draw(st.lists(st.sampled_from([300 * MIB, 700 * MIB, 1 * GIB, 4 * GIB]), min_size=k, max_size=k))
    gaps = st.sampled_from([0.2, 1.0, 3.0, 12.0])  # seconds until the next loop pass
    events = draw(st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, k - 1), gaps), max_size=30))
    # When the events stop, what is transient resolves: a joining or suspect node is either
    # declared alive (it answers) or dead (it does not).
    outcomes = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    return memories, events, outcomes


def converge(run):  # type: ignore[no-untyped-def]
    """Play the events through the loop, let what is transient resolve, and run the loop on
    until nothing is left to do: (nodes, engine, now, last actions)."""
    memories, events, outcomes = run
    nodes = [SimNode(name=f"w{i + 1}", memory=m) for i, m in enumerate(memories)]
    engine = dict(state=EngineState.STOPPED, plan=None, considered=frozenset(), started_at=0.0, busy=False)
    now = 100.0
    for what, i, dt in events:
        apply_event(what, nodes[i], now, engine)
        now += dt
        loop_step(nodes, engine, now)

    for node, answers in zip(nodes, outcomes):
        if node.state == "joining":
            node.set_state("alive" if answers and node.rpc_ready else "dead", now)
        elif node.state == "suspect":
            node.set_state("alive" if answers else "dead", now)
        if node.state == "alive":
            node.stalled = False
        else:
            node.set_rpc(False, now)
    engine["busy"] = False

    # A few steps: the longest wait is a planned node's RPC server down, which holds the
    # plan for GRACE_S; then a stop and a start (which loads in one step here).
    max_steps = int(GRACE_S / STEP_S) + 4
    for step in range(max_steps + 1):
        now += STEP_S
        desired, actions = loop_step(nodes, engine, now)
        if (not actions and not desired.hold and not desired.deferred) or (
            len(actions) == 1 and isinstance(actions[0], Wait) and actions[0].kind in (WaitKind.DEGRADED, WaitKind.NO_WORKERS)
        ):
            event(f"converged in {step + 1} step(s)")
            return nodes, engine, now, actions
    raise AssertionError(f"not converged after {max_steps} steps: {actions}, engine {engine['state']}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_runs())
def test_any_sequence_of_membership_events_converges(run) -> None:  # type: ignore[no-untyped-def]
    nodes, engine, now, actions = converge(run)
    usable = [n.name for n in nodes if n.view(now).usable]
    event(f"{len(usable)} usable, " + ("waits: " + actions[0].kind.value if actions else "serves"))
    fresh = fits_views([n.view(now) for n in nodes if n.view(now).usable])
    if actions:  # genuinely degraded: nothing runs, and the usable nodes cannot hold the model
        assert engine["state"] not in (EngineState.LOADING, EngineState.SERVING)
        assert fresh is None
        assert (actions[0].kind == WaitKind.NO_WORKERS) == (not usable)
    else:  # serving the plan over the usable nodes
        assert engine["state"] == EngineState.SERVING
        plan = engine["plan"]
        assert {a.node for a in plan.rpc_assignments} <= set(usable)
        assert fresh is not None  # it serves only what the usable nodes can hold
        # Either the plan a fresh start would make, or (after a loss) the stable re-plan that
        # moved only the lost node's layers: every layer placed once, within each node's memory.
        views = {n.name: n.view(now) for n in nodes}
        assert [a.start for a in plan.assignments] == [0] + [a.end for a in plan.assignments[:-1]]
        assert plan.assignments[-1].end == plan.n_layers and plan.output_node == plan.assignments[-1].node
        for a in plan.rpc_assignments:
            assert a.total_bytes <= views[a.node].plannable_bytes
    # Converged means converged: more steps change nothing.
    state, key = engine["state"], engine["plan"].key() if engine["plan"] else None
    for _ in range(3):
        now += STEP_S
        _, again = loop_step(nodes, engine, now)
        assert again == actions
        assert (engine["state"], engine["plan"].key() if engine["plan"] else None) == (state, key)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_runs(), st.lists(st.integers(-256, 256), min_size=4, max_size=4))
@example(([4 * GIB, 4 * GIB, 300 * MIB], [("suspect", 2, 0.2)], [True, True, True]), [10, 0, 0, 0])
def test_memory_jitter_never_replans_a_converged_cluster(run, jitter_mib: list[int]) -> None:  # type: ignore[no-untyped-def]
    """The reconciler's promise: free-memory jitter never re-plans; only a change in the set
    of usable nodes does."""
    nodes, engine, now, actions = converge(run)
    assume(not actions)
    for node, j in zip(nodes, jitter_mib):
        node.memory = max(node.memory + j * MIB, 0)
    now += STEP_S
    _, after = loop_step(nodes, engine, now)
    assert after == [], f"jitter {jitter_mib} MiB: {after}"


def fits_views(usable: list[NodeView]) -> Plan | None:
    caps = [NodeCapacity(name=v.name, free_bytes=v.plannable_bytes, speed=v.speed, endpoint=v.endpoint) for v in usable]
    return fits(caps, RECONCILER_PROFILE, N_CTX, "proportional") if caps else None


@st.composite
def node_views(draw: st.DrawFn) -> list[NodeView]:
    """Members in any state, mostly usable (as a cluster mostly is)."""
    k = draw(st.integers(1, 5))
    mostly = st.sampled_from([True, True, True, False])
    views = []
    for i in range(k):
        state = draw(st.sampled_from(["alive", "alive", "alive", "joining", "suspect", "dead", "left"]))
        ready = state in ("alive", "joining", "suspect") and draw(mostly)
        views.append(NodeView(
            name=f"w{i + 1}", endpoint=f"10.0.0.{i + 1}:50052", state=state, rpc_ready=ready,
            cordoned=not draw(mostly), plannable_bytes=draw(st.sampled_from([4 * GIB, 300 * MIB, 1 * GIB, 4 * GIB])),
            speed=draw(POSITIVE_SPEEDS), state_age_s=draw(st.sampled_from([0.0, 1.0, 30.0, 30.0])),
            rpc_down_s=0.0 if ready else draw(st.sampled_from([0.0, 1.0, 30.0])),
            rpc_refused=not ready and not draw(mostly), stalled_engine=state == "suspect" and not draw(mostly),
        ))
    return views


@FAST
@given(node_views(), st.sampled_from(STRATEGIES), st.booleans(), st.floats(0.0, 1e6))
def test_a_converged_state_yields_no_action(views: list[NodeView], strategy: str, defer: bool, now: float) -> None:
    """Idempotence: once the engine serves what is desired, reconciling again does nothing;
    and a degraded cluster only waits."""
    d = desired_state(nodes=views, profile=RECONCILER_PROFILE, n_ctx=N_CTX, strategy=strategy)  # type: ignore[arg-type]
    event(("holds" if d.hold else "degraded") if d.plan is None else f"plan over {len(d.plan.rpc_assignments)} worker(s)")
    if d.plan is None:
        engine = EngineView(state=EngineState.STOPPED)
        actions = reconcile(desired=d, engine=engine, restart_allowed=True, timing=ENGINE_T, now=now)
        assert len(actions) == 1 and isinstance(actions[0], Wait)
        return
    engine = EngineView(state=EngineState.SERVING, plan=d.plan, considered=d.considered, started_at=now, last_progress_at=now)
    for later in (now, now + 1.0, now + 1000.0):
        again = desired_state(nodes=views, profile=RECONCILER_PROFILE, n_ctx=N_CTX, strategy=strategy,  # type: ignore[arg-type]
                              current=d.plan, current_considered=d.considered, defer_growth=defer)
        assert again.plan is d.plan and again.considered == d.considered
        assert reconcile(desired=again, engine=engine, restart_allowed=True, timing=ENGINE_T, now=later) == []


# -------------------------------------------------------------------------- membership

HB = Timing().heartbeat


def hello(name: str) -> dict:  # type: ignore[type-arg]
    return {
        "name": name, "node_id": f"id-{name}", "hostname": name, "protocol": PROTOCOL_MAJOR, "rpc_protocol": "7.0.0",
        "version": "0.1.0", "rpc_port": 50052, "rpc_host": "10.0.0.5", "rpc_ready": True,
        "memory": {"total": 8 << 30, "free": 6 << 30, "plannable": 6 << 30}, "devices": [{"name": "CPU", "type": "cpu"}],
    }


def fresh_membership() -> Membership:
    return Membership(timing=Timing().heartbeat, rpc_protocol="7.0.0", package_version="0.1.0")


GAPS = st.one_of(st.floats(0.0, 3 * HB.DEAD_AFTER_S, allow_nan=False), st.sampled_from([HB.SUSPECT_AFTER_S, HB.DEAD_AFTER_S]))
# Steps: after a gap, a tick (None) or a heartbeat from node i (with rpc_ready, without, or no word).
RUNS = st.integers(1, 3).flatmap(lambda k: st.tuples(
    st.just(k),
    st.lists(st.tuples(GAPS, st.one_of(st.none(), st.integers(0, k - 1)), st.one_of(st.none(), st.booleans())), max_size=60),
))


def run_membership(k: int, steps, on_tick) -> None:  # type: ignore[no-untyped-def]
    """Drive a membership of k nodes through the steps; `on_tick(m, now, before)` checks each
    tick, `before` being each node's (state, silence) as the tick found it."""
    m = fresh_membership()
    names = [f"w{i}" for i in range(k)]
    now = 0.0
    for name in names:
        m.hello(identity=name.encode(), body=hello(name), peer_address="10.0.0.5", now=now)
    for gap, who, rpc_ready in steps:
        now += gap
        if who is None:
            before = {name: (n.state, now - n.last_seen) for name, n in m.nodes.items()}
            m.tick(now)
            on_tick(m, now, before)
        else:
            node = m.nodes[names[who]]
            was = node.state
            m.heartbeat(identity=node.identity, body={} if rpc_ready is None else {"rpc_ready": rpc_ready}, now=now)
            # A message never makes a node suspect or dead: it revives a suspect node and
            # re-admits a dead one through JOINING.
            assert node.state == was or (was, node.state) in (
                (NodeState.SUSPECT, NodeState.ALIVE), (NodeState.DEAD, NodeState.JOINING)
            )


@settings(max_examples=200, deadline=None)
@given(RUNS)
def test_alive_goes_dead_only_through_suspect_or_one_long_silence(run) -> None:  # type: ignore[no-untyped-def]
    """Each tick applies the failure detector's rule to the silence it sees, so an ALIVE node
    that goes DEAD passes SUSPECT unless one tick finds it ALIVE and silent > DEAD_AFTER_S."""

    def on_tick(m: Membership, now: float, before) -> None:  # type: ignore[no-untyped-def]
        for name, n in m.nodes.items():
            was, silent = before[name]
            if was in (NodeState.ALIVE, NodeState.SUSPECT, NodeState.JOINING) and silent > HB.DEAD_AFTER_S:
                assert n.state == NodeState.DEAD and not n.rpc_ready
            elif was == NodeState.ALIVE:
                assert n.state == (NodeState.SUSPECT if silent > HB.SUSPECT_AFTER_S else NodeState.ALIVE)
            elif was == NodeState.JOINING:
                assert n.state == NodeState.JOINING or (n.state == NodeState.ALIVE and n.rpc_ready)
            else:  # SUSPECT, DEAD and LEFT wait for a message
                assert n.state == was

    k, steps = run
    run_membership(k, steps, on_tick)


@settings(max_examples=200, deadline=None)
@given(RUNS)
@example((1, [(4.0, None, None)]))
def test_no_tick_leaves_a_node_alive_that_is_silent_past_suspect(run) -> None:  # type: ignore[no-untyped-def]
    def on_tick(m: Membership, now: float, before) -> None:  # type: ignore[no-untyped-def]
        for n in m.nodes.values():
            if n.state == NodeState.ALIVE:
                assert now - n.last_seen <= HB.SUSPECT_AFTER_S, f"{n.name} alive while silent {now - n.last_seen:.1f}s"

    k, steps = run
    run_membership(k, steps, on_tick)


@settings(max_examples=200, deadline=None)
@given(st.lists(
    st.tuples(
        st.floats(0.0, HB.SUSPECT_AFTER_S, exclude_max=True, allow_nan=False),  # the gap to the next heartbeat
        st.lists(st.floats(0.0, 1.0), max_size=4),  # ticks within that gap, as fractions of it
    ),
    min_size=1, max_size=80,
))
def test_a_node_that_heartbeats_in_time_is_never_suspect(beats: list[tuple[float, list[float]]]) -> None:
    m = fresh_membership()
    node, _ = m.hello(identity=b"a", body=hello("w1"), peer_address="10.0.0.5", now=0.0)
    now = 0.0
    for gap, ticks in beats:
        for t in sorted(ticks):
            events = m.tick(now + t * gap)
            assert all(e.kind not in ("suspect", "dead") for e in events)
            assert node.state in (NodeState.JOINING, NodeState.ALIVE)
        now += gap
        m.heartbeat(identity=b"a", body={"rpc_ready": True}, now=now)
        assert node.state in (NodeState.JOINING, NodeState.ALIVE)
    # And once it has been up for the settle time, a tick makes it alive.
    m.tick(max(now, HB.JOIN_SETTLE_S))
    assert node.state == NodeState.ALIVE
