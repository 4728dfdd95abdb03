"""The self-stabilizing core: desired state, actual state, and the actions between them.

Two pure functions, no I/O:

* `desired_state(...)` turns config + live membership + model profile (+ the plan in
  use, for hysteresis) into the plan the cluster should run, or the reason it cannot.
* `reconcile(...)` compares that with the engine's actual state and returns the actions
  that move actual towards desired: start the engine with a plan, stop it, or wait.

The head's loop (`appliance.head.supervisor`) calls both every RECONCILE_INTERVAL_S and executes the
actions. Because the decision is recomputed from scratch each time, the cluster
converges from any state (worker died, worker rejoined, engine crashed, head restarted),
and a converged state yields no action (tested as a property).

Hysteresis against reload storms:
  * a node in the loaded plan that is only suspect or re-joining holds the plan (no
    re-plan) — it is either back soon or declared dead; the exception is a node whose
    RPC port the head found refusing connections (its RPC server process is gone, so the
    engine cannot use it whatever its heartbeats say): it leaves the plan at once; and so
    does a suspect node while the engine is stalled (requests wait, no token comes): the
    silent box is what it waits on, and holding the plan would only hold the stall;
  * new nodes join the plan only once they are ALIVE, i.e. after a settle time that
    doubles with each recent death (membership.py), and not while the engine is loading
    or resuming requests, nor (up to GROWTH_DEFER_MAX_S) while it serves requests: a
    box that comes back must not interrupt the answers the others are carrying;
  * free-memory jitter never re-plans: the plan changes only when the set of usable
    nodes changes;
  * engine (re)starts go through a crash-loop guard with exponential backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from appliance.common.config import EngineTiming
from appliance.common.kinds import RUNNING_ENGINE_STATES, EngineState
from appliance.core.planner import NodeCapacity, Plan, PlanError, Strategy, make_plan, replan_without
from appliance.core.profile import ModelProfile


@dataclass(frozen=True)
class NodeView:
    """What the reconciler needs to know about one member."""

    name: str
    endpoint: str
    state: str  # Liveness value
    rpc_ready: bool
    cordoned: bool
    plannable_bytes: int
    speed: float = 1.0
    state_age_s: float = 0.0  # time in the current state
    rpc_down_s: float = 0.0  # how long a live node's RPC server has been down (0: up)
    rpc_refused: bool = False  # the head's probe was refused: nothing listens on the RPC port
    stalled_engine: bool = False  # went silent while the engine stalled waiting on it (until it answers)

    @property
    def usable(self) -> bool:
        return self.state == "alive" and self.rpc_ready and not self.cordoned and not self.rpc_refused


@dataclass(frozen=True)
class Desired:
    plan: Plan | None
    considered: frozenset[str] = frozenset()  # usable nodes the plan was made from
    hold: str = ""  # a plan node is suspect/re-joining: keep the plan, don't (re)start yet
    degraded: str = ""  # no plan possible: why
    no_workers: bool = False  # degraded because no worker is usable at all (also at start-up)
    deferred: str = ""  # usable nodes wait to join the plan until the engine is settled: who


@dataclass(frozen=True)
class EngineView:
    state: EngineState
    plan: Plan | None = None
    considered: frozenset[str] = frozenset()
    started_at: float = 0.0
    last_progress_at: float = 0.0
    busy: bool = False


class WaitKind(str, Enum):
    """Why the loop waits: the head turns some into events (`waiting`, `degraded`), not by text."""

    STOPPING = "stopping"  # an engine is stopping; act once it is gone
    NO_PLAN = "no_plan"  # nothing decided yet (the head just started)
    GATHERING = "gathering"  # no plan yet: nodes are still joining
    HOLD = "hold"  # a planned node is suspect or re-joining: keep the plan
    NO_WORKERS = "no_workers"  # no usable worker at all
    DEGRADED = "degraded"  # the usable nodes cannot hold the model
    BACKOFF = "backoff"  # the engine keeps failing: crash-loop backoff


@dataclass(frozen=True)
class StartEngine:
    plan: Plan
    considered: frozenset[str]
    reason: str


@dataclass(frozen=True)
class StopEngine:
    reason: str
    stalled: bool = False  # blocked inside ggml: kill without the grace period


@dataclass(frozen=True)
class Wait:
    reason: str
    kind: WaitKind


@dataclass(frozen=True)
class Adopt:
    """The running layout is still the right one for a changed set of usable nodes (a node
    came back but gets no layers): remember that set, so that later passes compare with it
    and free-memory jitter does not re-plan."""

    considered: frozenset[str]


Action = StartEngine | StopEngine | Wait | Adopt


def _capacities(usable: Sequence[NodeView], head_memory: int) -> list[NodeCapacity]:
    caps = [NodeCapacity(name=n.name, free_bytes=n.plannable_bytes, speed=n.speed, endpoint=n.endpoint) for n in usable]
    if head_memory > 0:
        caps.insert(0, NodeCapacity(name="head", free_bytes=head_memory, is_head=True))
    return caps


def _plan_for(
    usable: Sequence[NodeView], *, profile: ModelProfile, n_ctx: int, head_memory: int, strategy: Strategy, lanes: int
) -> Plan:
    return make_plan(
        nodes=_capacities(usable, head_memory), profile=profile, n_ctx=n_ctx, strategy=strategy, lanes=lanes
    )


def failover_plan(
    current: Plan, *, lost: str, nodes: Sequence[NodeView], profile: ModelProfile, n_ctx: int, head_memory: int = 0
) -> Plan | None:
    """The plan the cluster would move to if `lost` died now (the stable re-plan over the
    rest of the current plan's nodes), or None if the survivors could not hold the model
    that way. What the head pre-stages on the survivors' disks."""
    survivors = [n for n in nodes if n.name != lost and n.name in {a.node for a in current.assignments}]
    return replan_without(
        current, nodes=_capacities(survivors, head_memory), profile=profile, n_ctx=n_ctx, lanes=current.lanes
    )


def desired_state(
    *,
    nodes: Sequence[NodeView],
    profile: ModelProfile,
    n_ctx: int,
    head_memory: int = 0,
    strategy: Strategy = "proportional",
    lanes: int = 1,
    max_lanes: int = 64,
    current: Plan | None = None,
    current_considered: frozenset[str] = frozenset(),
    force_replan: bool = False,
    defer_growth: bool = False,
    join_wait_s: float = 10.0,
    rpc_grace_s: float = 5.0,
) -> Desired:
    """The plan the cluster should run now.

    `current` is the plan the engine runs (or loads); `defer_growth` says the engine is
    busy (loading, resuming or serving requests): new usable nodes then wait instead of
    causing a re-plan. Losing a node never waits.
    """
    by_name = {n.name: n for n in nodes}
    usable = [n for n in nodes if n.usable]
    # Engine lanes (appliance.engine.lanes): 0 means one per node that can hold layers, so
    # concurrent requests can keep each busy; a stable re-plan keeps the lanes it had.
    if lanes <= 0:
        lanes = len(usable) + (1 if head_memory > 0 else 0)
    lanes = max(1, min(lanes, max_lanes))
    usable_names = frozenset(n.name for n in usable)
    # Nodes that just announced themselves: plan once they are in, not twice.
    gathering = sorted(
        n.name for n in nodes if n.state == "joining" and not n.cordoned and n.state_age_s < join_wait_s
    )

    lost: list[str] = []
    if current is not None and not force_replan:
        in_plan = [a.node for a in current.rpc_assignments]
        lost = [
            name
            for name in in_plan
            if name not in by_name
            or by_name[name].state in ("dead", "left", "refused")
            or by_name[name].cordoned
            or by_name[name].rpc_down_s > rpc_grace_s
            or by_name[name].rpc_refused
            or (by_name[name].state == "suspect" and by_name[name].stalled_engine)
            or by_name[name].endpoint != current.rpc_assignments[in_plan.index(name)].endpoint
        ]
        if not lost:
            shaky = [
                name for name in in_plan if by_name[name].state != "alive" or not by_name[name].rpc_ready
            ]
            if shaky:
                return Desired(
                    plan=current,
                    considered=current_considered,
                    hold=f"waiting for {', '.join(sorted(shaky))} ({', '.join(by_name[n].state for n in sorted(shaky))})",
                )
            if usable_names <= current_considered or gathering:
                return Desired(plan=current, considered=current_considered)
            if defer_growth:
                new = sorted(usable_names - current_considered)
                return Desired(
                    plan=current,
                    considered=current_considered,
                    deferred=f"{', '.join(new)} will join the plan once the engine is not busy",
                )
            # New usable nodes: fall through and re-plan with them.
    elif current is None and gathering:
        return Desired(plan=None, hold=f"waiting for {', '.join(gathering)} to finish joining")

    if not usable:
        waiting = [n.name for n in nodes if n.state in ("joining", "suspect")]
        why = "no worker is ready" + (f" ({', '.join(sorted(waiting))} joining)" if waiting else "")
        if head_memory > 0:
            try:
                plan = _plan_for(
                    [], profile=profile, n_ctx=n_ctx, head_memory=head_memory, strategy=strategy, lanes=lanes
                )
                return Desired(plan=plan, considered=frozenset())
            except PlanError as exc:
                return Desired(plan=None, degraded=f"{why}; {exc}", no_workers=True)
        return Desired(plan=None, degraded=why, no_workers=True)
    if current is not None and not force_replan and lost:
        # A node was lost: move as few layers as possible (its layers go to its neighbours);
        # nodes outside the old plan join later, at a growth re-plan.
        stable = replan_without(
            current, nodes=_capacities(usable, head_memory), profile=profile, n_ctx=n_ctx, lanes=current.lanes
        )
        if stable is not None:
            return Desired(plan=stable, considered=usable_names & (current_considered | {a.node for a in stable.assignments}))
    try:
        plan = _plan_for(
            usable, profile=profile, n_ctx=n_ctx, head_memory=head_memory, strategy=strategy, lanes=lanes
        )
    except PlanError as exc:
        return Desired(plan=None, considered=usable_names, degraded=str(exc))
    if current is not None and plan.key() == current.key():
        return Desired(plan=current, considered=usable_names)
    return Desired(plan=plan, considered=usable_names)


def reconcile(
    *,
    desired: Desired,
    engine: EngineView,
    restart_allowed: bool,
    timing: EngineTiming,
    now: float,
    stalled: bool = False,
) -> list[Action]:
    """The actions that move the engine towards `desired`; none when converged.

    `stalled`: the engine serves, requests wait, and no token came for a while (it is
    blocked on a silent worker): a stop then needs no grace period.
    """
    running = engine.state in RUNNING_ENGINE_STATES
    if engine.state == EngineState.STOPPING:
        return [Wait("engine is stopping", WaitKind.STOPPING)]
    if desired.plan is None:
        if not desired.degraded:
            if desired.hold:
                return [Wait(desired.hold, WaitKind.GATHERING)]
            return [Wait("no plan yet", WaitKind.NO_PLAN)]
        if running:
            return [StopEngine(f"degraded: {desired.degraded}", stalled=stalled)]
        kind = WaitKind.NO_WORKERS if desired.no_workers else WaitKind.DEGRADED
        return [Wait(f"degraded: {desired.degraded}", kind)]
    if running and (engine.plan is None or engine.plan.key() != desired.plan.key()):
        return [StopEngine("re-plan: the layout changed", stalled=stalled)]
    load_timed_out = engine.state == EngineState.LOADING and now - engine.started_at > timing.ENGINE_LOAD_TIMEOUT_S
    if desired.hold and engine.state != EngineState.SERVING:
        if load_timed_out:
            return [StopEngine(f"engine cannot finish while {desired.hold}")]
        return [Wait(desired.hold, WaitKind.HOLD)]
    if load_timed_out:
        return [StopEngine(f"model load took over {timing.ENGINE_LOAD_TIMEOUT_S:.0f}s")]
    if (
        engine.state == EngineState.SERVING
        and engine.busy
        and now - engine.last_progress_at > timing.ENGINE_STALL_TIMEOUT_S
    ):
        return [StopEngine(f"no decode progress for {timing.ENGINE_STALL_TIMEOUT_S:.0f}s", stalled=True)]
    if running:
        if desired.considered != engine.considered and engine.plan is desired.plan:
            return [Adopt(desired.considered)]
        return []
    if not restart_allowed:
        return [Wait("engine restart backoff", WaitKind.BACKOFF)]
    return [StartEngine(desired.plan, desired.considered, "engine not running")]
