"""A worker agent's configuration, parsed once by the CLI (`anyway worker` flags or YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.common.config import Timing


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    head: str
    """tcp://HOST:PORT of the head's control plane."""
    name: str
    """This node's name in the cluster (default: the host name)."""
    rpc_port: int
    """Port of the ggml RPC server."""
    rpc_host: str = ""
    """Explicit bind/announce address; default: the address the head sees."""
    cache_dir: str = ""
    """The RPC server's tensor cache (re-loads read large tensors from here)."""
    threads: int = 0
    """Threads of the RPC server's CPU backend (0: all cores)."""
    max_memory_bytes: int = 0
    """Cap on the memory offered to the cluster (0: no cap)."""
    speed: float = 0.0
    """Speed to report (0: measure at start-up)."""
    rpc_advertise: str = ""
    """HOST:PORT the head dials instead (NAT, port forward, proxy)."""
    device: str = "auto"
    """Which ggml device the RPC server exposes: auto, cpu, gpu, or an index/name."""
    cache_quota_bytes: int = 0
    """Disk the tensor cache may use (0: nine tenths of what is free when the worker starts)."""
    staging_rate_bytes_s: int = 40 * 1024 * 1024
    """Pre-staging pulls tensors from the head at most this fast (0: no pre-staging)."""
    keys_dir: str = ""
    """This node's keys (node.key_secret, server.key); "" only with --insecure."""
    data_plane: str = "tls"
    """"tls": the C RPC server on loopback behind the authenticated, encrypted channel;
    "plain": the C server itself on the RPC address, which must then be a loopback address
    (`anyway up`), or anything with --insecure (no keys at all; development only)."""
    timing: Timing = field(default_factory=Timing)
