"""The cluster's status and event contract: what the head serves, what the CLI and dashboard read.

Why one typed module: `GET /v1/cluster`, `/v1/events`, `/health` and the operator
actions are read by `anyway status`, `anyway up`'s progress line and every dashboard
widget. The head builds these models (they are the API's `response_model`); clients
parse a body once with `ClusterStatus.model_validate(...)` and then use attributes,
never `.get()` chains over dicts that can drift apart. Unknown extra fields are ignored
(an older dashboard keeps working against a newer head); a missing or mistyped field
is a validation error, which clients show as "unexpected answer from the head".
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from appliance.common.kinds import EngineState, EventKind, HealthState, NodeState, Severity

__all__ = [
    "AssignmentStatus",
    "ClusterStatus",
    "DeviceInfo",
    "EngineState",
    "EngineStats",
    "EngineStatus",
    "Event",
    "EventKind",
    "EventsPage",
    "Excluded",
    "Health",
    "HealthResponse",
    "HealthState",
    "LoadProgress",
    "ModelStatus",
    "NodeActionResult",
    "NodeCache",
    "NodeFailover",
    "NodeLoad",
    "NodeMemory",
    "NodeState",
    "NodeStatus",
    "NodeVersions",
    "PlanStatus",
    "ReloadResult",
    "Severity",
    "SpeculationStatus",
    "Throughput",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Health(_Model):
    status: HealthState
    reason: str = ""


class NodeMemory(_Model):
    total_bytes: int = 0
    free_bytes: int = 0
    plannable_bytes: int = 0
    planned_bytes: int = 0


class DeviceInfo(_Model):
    index: int = 0
    name: str = ""
    description: str = ""
    type: str = "unknown"
    free_bytes: int = 0
    total_bytes: int = 0


class NodeVersions(_Model):
    package: str = ""
    rpc_protocol: str = ""
    protocol: str = ""
    llama_cpp: str = ""
    llamafile: str = ""  # "on" when its ggml uses llamafile's sgemm (resumes may drift)


class NodeLoad(_Model):
    cpu_percent: float | None = None
    ram_percent: float | None = None
    loadavg_1m: float | None = None
    rpc_rss_bytes: float | None = None
    rpc_read_bytes: float | None = None  # read by its RPC server since it started (network and cache)
    rpc_busy: float | None = None  # fraction of wall time its RPC server computed, over the last heartbeat interval
    gpu_mem_percent: float | None = None


class NodeCache(_Model):
    """The worker's tensor cache (ggml's RPC cache directory) and its pre-staging."""

    used_bytes: int = 0
    quota_bytes: int = 0
    missing_count: int = 0  # tensors it is to pre-stage and does not have yet
    missing_bytes: int = 0
    blocked: str = ""  # why staging cannot go on (e.g. the quota is full of tensors it needs)


class NodeFailover(_Model):
    """What losing this node would cost the survivors, for the plan the engine runs."""

    possible: bool = False  # a stable re-plan exists (only the node's layers move)
    bytes: int = 0  # weights the survivors would receive
    cacheable_bytes: int = 0  # of which ggml looks up in their caches (tensors over 10 MiB)
    staged_bytes: int = 0  # of which are already on their disks
    staged: bool = False  # all of them: the failover sends no cacheable weights


class NodeStatus(_Model):
    name: str
    address: str = ""
    hostname: str = ""
    rpc_endpoint: str | None = None
    state: NodeState
    liveness: str = ""
    cordoned: bool = False
    rpc_ready: bool = False
    heartbeat_age_s: float = 0.0
    layers: tuple[int, int] | None = None
    """[first, end) layer range in the plan shown, None when the node holds no layers."""
    n_layers: int = 0
    memory: NodeMemory = Field(default_factory=NodeMemory)
    memory_history: list[tuple[float, int]] = Field(default_factory=list)
    """(wall time, free bytes) samples, oldest first."""
    devices: list[DeviceInfo] = Field(default_factory=list)
    versions: NodeVersions = Field(default_factory=NodeVersions)
    load: NodeLoad = Field(default_factory=NodeLoad)
    speed: float = 0.0
    joined_at: float = 0.0
    reason: str = ""
    cache: NodeCache | None = None
    failover: NodeFailover | None = None


class AssignmentStatus(_Model):
    node: str
    endpoint: str | None = None
    is_head: bool = False
    start: int
    end: int
    n_layers: int = 0
    weight_bytes: int = 0
    kv_bytes: int = 0
    reserve_bytes: int = 0
    extra_bytes: int = 0
    free_bytes: int = 0
    total_bytes: int = 0


class Excluded(_Model):
    node: str
    reason: str


class PlanStatus(_Model):
    strategy: str = ""
    n_layers: int = 0
    n_ctx: int = 0
    lanes: int = 1  # engine contexts the plan reserved compute buffers for
    output_node: str = ""
    n_gpu_layers: int = 0
    tensor_split: list[float] = Field(default_factory=list)
    rpc_endpoints: list[str] = Field(default_factory=list)
    assignments: list[AssignmentStatus] = Field(default_factory=list)
    excluded: list[Excluded] = Field(default_factory=list)


class EngineStats(_Model):
    """The running engine's counters since it started (from its heartbeats)."""

    active: int = 0
    queued: int = 0
    steps: int = 0
    tokens: int = 0
    prefilled: int = 0
    decodes: int = 0
    drafted: int = 0  # drafted tokens checked (speculative decoding)
    accepted: int = 0  # of those, accepted


class SpeculationStatus(_Model):
    """Speculative decoding: where drafts come from and how often they are right."""

    mode: str = "off"
    """"prompt" (prompt lookup), "model" (a draft model on the head) or "off"."""
    default: bool = False
    """Requests speculate unless they send `speculative: false`."""
    draft_model: str = ""
    """The draft model's file name (mode "model")."""
    draft_max: int = 0
    """Most drafted tokens per request and decode step."""
    drafted: int = 0
    """Drafted tokens checked since the head started (every engine)."""
    accepted: int = 0
    acceptance: float | None = None
    """accepted / drafted (None before any draft)."""


class LoadProgress(_Model):
    """One worker's share of the engine's model load, measured at the worker."""

    node: str
    bytes: int = 0  # read by its RPC server since this load began (network and cache)
    total_bytes: int = 0  # the weights it is to hold
    bytes_per_s: float = 0.0


class EngineStatus(_Model):
    state: EngineState
    generation: int = 0
    pid: int | None = None
    progress: float = 0.0
    plan_nodes: list[str] = Field(default_factory=list)
    n_ctx_seq: int = 0
    max_batch: int = 0
    lanes: int = 1  # contexts decoding at once over the same weights (appliance.engine.lanes)
    load_s: float | None = None
    restarts: int = 0
    """Engines lost unexpectedly (crashes, failed loads); planned re-plans do not count."""
    last_error: str = ""
    last_exit: int | None = None
    last_recovery_s: float | None = None
    requests_in_flight: int = 0
    stats: EngineStats = Field(default_factory=EngineStats)
    load: list[LoadProgress] = Field(default_factory=list)
    """Per worker, while the engine starts or loads (and the last load's figures after)."""
    speculation: SpeculationStatus = Field(default_factory=SpeculationStatus)


class Throughput(_Model):
    tokens_per_s: float = 0.0
    requests_in_flight: int = 0


class ModelStatus(_Model):
    id: str
    name: str = ""
    path: str = ""
    architecture: str = ""
    file_bytes: int = 0
    n_layers: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    total_weight_bytes: int = 0
    kv_bytes_per_token_per_layer: int = 0
    context_length: int = 0
    embedding_length: int = 0
    vocab_size: int = 0
    has_chat_template: bool = False


class ClusterStatus(_Model):
    """`GET /v1/cluster`."""

    version: str
    health: Health
    model: ModelStatus
    nodes: list[NodeStatus] = Field(default_factory=list)
    plan: PlanStatus | None = None
    """The loaded plan (or, before the first load, the desired one)."""
    desired_plan: PlanStatus | None = None
    engine: EngineStatus
    throughput: Throughput = Field(default_factory=Throughput)
    events_last_id: int = 0
    uptime_s: float = 0.0
    now: float = 0.0
    """The head's wall clock: ages of events and joins are relative to it."""

    def node(self, name: str) -> NodeStatus | None:
        return next((n for n in self.nodes if n.name == name), None)


class Event(_Model):
    id: int
    ts: float
    """Wall clock, seconds since the epoch."""
    kind: EventKind
    node: str = ""
    message: str = ""


class EventsPage(_Model):
    """`GET /v1/events?since=ID`."""

    events: list[Event] = Field(default_factory=list)
    last_id: int = 0


class HealthResponse(_Model):
    """`GET /health` (200 when ok, 503 otherwise)."""

    status: HealthState
    reason: str = ""
    engine: EngineState
    model: str


class NodeActionResult(_Model):
    """`POST /v1/nodes/{name}/drain` and `/uncordon`."""

    node: str
    state: NodeState


class ReloadResult(_Model):
    """`POST /v1/reload`."""

    status: str = "reloading"
