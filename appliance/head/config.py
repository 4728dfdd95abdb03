"""The head's configuration: what `anyway head` was asked to serve, and how.

Parsed once by the CLI (flags, or a YAML file with the same names) into this frozen
value; the supervisor, the API and the engine manager read it, nobody changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.common.config import (
    DEFAULT_API_PORT,
    DEFAULT_CONTROL_PORT,
    DEFAULT_DRAFT_MAX_TOKENS,
    DEFAULT_MAX_BATCH,
    DEFAULT_N_CTX,
    Timing,
)


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    model_path: str
    """The GGUF file; only the head reads it (workers receive their layers over RPC)."""
    control_bind: str = f"tcp://0.0.0.0:{DEFAULT_CONTROL_PORT}"
    """ZeroMQ endpoint the workers' agents connect to."""
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    n_ctx: int = DEFAULT_N_CTX
    """Context per request (per sequence), tokens."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Requests decoded together (each has its own KV cache stream)."""
    max_queued: int = 32
    """Requests waiting for a place in the batch; past `max_batch + max_queued`, new ones get 429."""
    head_memory_bytes: int = 0
    """Memory the head's own CPU lends to layers (0: none)."""
    strategy: str = "speed"
    """Placement strategy: speed, memory or proportional (appliance.core.planner)."""
    max_tokens: int = 0
    """Per-request completion limit (0: up to the context)."""
    engine_threads: int = 0
    """llama.cpp threads in the engine (0: its default)."""
    engine_lanes: int = 1
    """Contexts decoding at once over the same weights, so concurrent requests keep every
    worker busy (appliance.engine.lanes); 1: one context; 0: one per node holding layers.
    Never more than max_batch (each lane holds at least one sequence)."""
    api_key: str | None = None
    """Inference key: bearer token required on /v1 (None: open, loopback only)."""
    admin_key: str | None = None
    """Admin key: the only key that may change state (drain, uncordon, reload); distinct from
    the inference key. None: admin actions only when the API is open (no keys, loopback)."""
    node_rpc_endpoints: dict[str, str] = field(default_factory=dict)
    """NODE -> HOST:PORT to dial for that node's RPC server instead of the address its control
    connection comes from (NAT, port forward). Only the head's configuration can say this."""
    max_body_bytes: int = 1 << 20
    """Largest HTTP request body."""
    run_dir: str = ""
    """Where the engine's socket and plan files go (default: a fresh temporary directory)."""
    model_name: str = ""
    """Model id on the API (default: the file name without .gguf)."""
    speculative: bool = True
    """Requests speculate (check drafted tokens) unless they say `speculative: false`."""
    draft_model_path: str = ""
    """A small GGUF model with the same vocabulary that drafts tokens on the head ("" : prompt lookup)."""
    draft_max: int = DEFAULT_DRAFT_MAX_TOKENS
    """Most drafted tokens checked per sequence and decode step (0: no speculative decoding at all)."""
    draft_min: int = 0
    """Check at least this many drafted tokens whenever there are drafts, whatever the adaptive
    length says (0: the adaptive length alone; for tests and for measuring)."""
    timing: Timing = field(default_factory=Timing)
