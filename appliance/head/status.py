"""Building the typed status the head serves (`/v1/cluster`) from its live state.

Kept apart from the supervisor so the supervisor only decides and acts; everything an
operator sees about nodes, plans and the engine is assembled here, into the models of
`appliance.common.status` that the CLI and the dashboard parse.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from appliance import __version__
from appliance.common.kinds import HealthState, Liveness, NodeState
from appliance.common.status import (
    AssignmentStatus,
    ClusterStatus,
    DeviceInfo,
    EngineStats,
    EngineStatus,
    Excluded,
    Health,
    LoadProgress,
    ModelStatus,
    NodeCache,
    NodeFailover,
    NodeLoad,
    NodeMemory,
    NodeStatus,
    NodeVersions,
    PlanStatus,
    SpeculationStatus,
    Throughput,
)
from appliance.core.membership import Membership, Node
from appliance.core.planner import Plan
from appliance.core.profile import ModelProfile
from appliance.head.engine_process import EngineProcess

MEMORY_HISTORY_SHOWN = 60


def display_state(node: Node, *, loaded: Plan | None) -> NodeState:
    """A node's liveness, or the operator's overlay: draining while the loaded plan still
    uses a cordoned node, cordoned after."""
    if node.cordoned and node.state not in (Liveness.DEAD, Liveness.LEFT):
        in_plan = loaded is not None and any(a.node == node.name for a in loaded.rpc_assignments)
        return NodeState.DRAINING if in_plan else NodeState.CORDONED
    return NodeState(node.state.value)


def plan_status(plan: Plan | None) -> PlanStatus | None:
    if plan is None:
        return None
    return PlanStatus(
        strategy=plan.strategy,
        n_layers=plan.n_layers,
        n_ctx=plan.n_ctx,
        lanes=plan.lanes,
        output_node=plan.output_node,
        n_gpu_layers=plan.n_gpu_layers,
        tensor_split=plan.tensor_split,
        rpc_endpoints=plan.rpc_endpoints,
        assignments=[
            AssignmentStatus(
                node=a.node, endpoint=a.endpoint, is_head=a.is_head, start=a.start, end=a.end, n_layers=a.n_layers,
                weight_bytes=a.weight_bytes, kv_bytes=a.kv_bytes, reserve_bytes=a.reserve_bytes,
                extra_bytes=a.extra_bytes, free_bytes=a.free_bytes, total_bytes=a.total_bytes,
            )
            for a in plan.assignments
        ],
        excluded=[Excluded(node=n, reason=r) for n, r in plan.excluded],
    )


def _node_status(
    n: Node, *, state: NodeState, plan: Plan | None, now: float, failover: dict[str, Any] | None = None
) -> NodeStatus:
    a = next((x for x in plan.assignments if x.node == n.name), None) if plan else None
    refused = n.state == Liveness.REFUSED
    return NodeStatus(
        name=n.name,
        address=n.address,
        hostname=n.hostname,
        rpc_endpoint=None if refused else n.rpc_endpoint,
        state=state,
        liveness=n.state.value,
        cordoned=n.cordoned,
        rpc_ready=n.rpc_ready,
        heartbeat_age_s=round(now - n.last_seen, 3),
        layers=(a.start, a.end) if a and a.n_layers else None,
        n_layers=a.n_layers if a else 0,
        memory=NodeMemory(
            total_bytes=n.memory_total, free_bytes=n.memory_free, plannable_bytes=n.plannable_bytes,
            planned_bytes=a.total_bytes if a else 0,
        ),
        memory_history=[(round(t, 1), f) for t, f in n.memory_history[-MEMORY_HISTORY_SHOWN:]],
        devices=[DeviceInfo.model_validate(d) for d in n.devices],
        versions=NodeVersions.model_validate(n.versions),
        load=NodeLoad.model_validate(n.load),
        speed=n.speed,
        joined_at=n.wall_joined_at,
        reason=n.reason,
        cache=NodeCache.model_validate(n.cache) if n.cache else None,
        failover=NodeFailover.model_validate(failover) if failover else None,
    )


def speculation_status(*, engine: EngineProcess, default: bool, drafted: int, accepted: int) -> SpeculationStatus:
    mode = "off" if not engine.draft_max else ("model" if engine.draft_model_path else "prompt")
    return SpeculationStatus(
        mode=mode,
        default=default and mode != "off",
        draft_model=Path(engine.draft_model_path).name if engine.draft_model_path else "",
        draft_max=engine.draft_max,
        drafted=drafted,
        accepted=accepted,
        acceptance=round(accepted / drafted, 4) if drafted else None,
    )


def engine_status(
    engine: EngineProcess, *, requests_in_flight: int, load: list[LoadProgress] | None = None,
    speculation: SpeculationStatus | None = None,
) -> EngineStatus:
    ready = engine.ready
    s = engine.stats
    return EngineStatus(
        state=engine.state,
        generation=engine.gen,
        pid=engine.proc.pid if engine.proc else None,
        progress=round(engine.progress, 3),
        plan_nodes=[a.node for a in engine.plan.assignments if a.n_layers] if engine.plan else [],
        n_ctx_seq=ready.n_ctx_seq if ready else engine.n_ctx_seq,
        max_batch=ready.max_batch if ready else engine.max_batch,
        lanes=engine.plan.lanes if engine.plan else 1,
        load_s=ready.load_s if ready else None,
        restarts=engine.crashes,
        last_error=engine.last_error,
        last_exit=engine.last_exit,
        last_recovery_s=round(engine.last_recovery_s, 3) if engine.last_recovery_s is not None else None,
        requests_in_flight=requests_in_flight,
        stats=EngineStats(active=s.active, queued=s.queued, steps=s.steps, tokens=s.tokens, prefilled=s.prefilled,
                          decodes=s.decodes, drafted=s.drafted, accepted=s.accepted),
        load=load or [],
        speculation=speculation or SpeculationStatus(),
    )


def model_status(profile: ModelProfile, *, model_id: str) -> ModelStatus:
    return ModelStatus(
        id=model_id,
        name=profile.name,
        path=profile.path,
        architecture=profile.architecture,
        file_bytes=profile.file_bytes,
        n_layers=profile.n_layers,
        input_bytes=profile.input_bytes,
        output_bytes=profile.output_bytes,
        total_weight_bytes=profile.total_weight_bytes,
        kv_bytes_per_token_per_layer=profile.kv_bytes_per_token_per_layer,
        context_length=profile.context_length,
        embedding_length=profile.embedding_length,
        vocab_size=profile.vocab_size,
        has_chat_template=profile.has_chat_template,
    )


def cluster_status(
    *,
    membership: Membership,
    engine: EngineProcess,
    desired_plan: Plan | None,
    health: tuple[HealthState, str],
    model: ModelStatus,
    tokens_per_s: float,
    requests_in_flight: int,
    events_last_id: int,
    started_at: float,
    failover: Callable[[str], dict[str, Any] | None] = lambda name: None,
    load: list[LoadProgress] | None = None,
    speculation: SpeculationStatus | None = None,
) -> ClusterStatus:
    now = time.monotonic()
    plan = engine.plan if engine.plan is not None else desired_plan
    nodes = [
        _node_status(n, state=display_state(n, loaded=engine.plan), plan=plan, now=now, failover=failover(n.name))
        for n in membership.nodes.values()
    ]
    nodes += [_node_status(r, state=NodeState.REFUSED, plan=None, now=now) for r in membership.refused.values()]
    status, reason = health
    return ClusterStatus(
        version=__version__,
        health=Health(status=status, reason=reason),
        model=model,
        nodes=nodes,
        plan=plan_status(plan),
        desired_plan=plan_status(desired_plan),
        engine=engine_status(engine, requests_in_flight=requests_in_flight, load=load, speculation=speculation),
        throughput=Throughput(tokens_per_s=round(tokens_per_s, 2), requests_in_flight=requests_in_flight),
        events_last_id=events_last_id,
        uptime_s=round(time.time() - started_at, 1),
        now=time.time(),
    )
