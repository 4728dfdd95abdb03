"""The worker's RPC server child process: ggml's RPC backend serving this box's device.

`ggml_backend_rpc_start_server` never returns, and a crash in it must not take the agent
(and its heartbeats) down, so it runs in its own process, started by the agent once the
head has accepted the node. The local tensor cache directory makes a re-load after a
re-plan cheap: the head sends tensor hashes and the worker reads the bytes from disk
instead of the network. It dies with its parent agent (PR_SET_PDEATHSIG).

The C server has no authentication and must never face the network. With `--keys` (the
default for `anyway worker`) it binds 127.0.0.1 on a port the kernel picks, and a TLS 1.3
listener in a thread of this same process (`appliance.common.dataplane`) is what listens
on `--endpoint`: only the head's certificate gets through to the C server. Both die
together, so a dead server still means a refused connection at the endpoint (the head's
fast failure detection). Without `--keys` (`--data-plane plain`, loopback only, or
`--insecure`) the C server binds `--endpoint` itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from appliance.common.process import die_with_parent

BACKEND_DISCOVERY_TIMEOUT_S = 30.0
"""How long the TLS front waits for the C server to listen before the process gives up."""


def _front(endpoint: str, keys_dir: str) -> None:
    """Thread: once the C server listens on loopback, open the TLS listener in front of it."""
    from appliance.common import dataplane
    from appliance.common.keys import KeyError_, load_worker_keys
    from appliance.common.netprobe import split_endpoint

    try:
        keys = load_worker_keys(keys_dir)
        ctx = dataplane.server_context(me=keys.node, head=keys.head)
        host, port = split_endpoint(endpoint)
        deadline = time.monotonic() + BACKEND_DISCOVERY_TIMEOUT_S
        backend = None
        while backend is None and time.monotonic() < deadline:
            backend = dataplane.loopback_backend_port()
            if backend is None:
                time.sleep(0.02)
        if backend is None:
            raise dataplane.DataPlaneError("the RPC server did not start listening on 127.0.0.1")
        relay = dataplane.Relay(name="worker")
        relay.serve_tls(host=host, port=port, backend=("127.0.0.1", backend), ctx=ctx, head=keys.head)
        print(f"anyway-rpc-server: TLS 1.3 on {endpoint} -> RPC server on 127.0.0.1:{backend} "
              f"(only {keys.head.name}'s certificate {keys.head.fingerprint} is let through)", flush=True)
    except (KeyError_, dataplane.DataPlaneError, ValueError, OSError) as exc:
        print(f"anyway-rpc-server: error: data plane: {exc}", flush=True)
        os._exit(3)  # the main thread is inside ggml and never returns: end the process from here


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anyway-rpc-server")
    p.add_argument("--endpoint", required=True, help="host:port the head dials")
    p.add_argument("--keys", default="", help="this node's keys directory: serve TLS on --endpoint, the C server on loopback")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, gpu, or a ggml device index/name")
    args = p.parse_args(argv)
    die_with_parent()
    from appliance.common import ggml

    devices = ggml.local_devices()
    try:
        indices = ggml.serving_device_indices(devices, args.device)
    except ggml.LlamaLibError as exc:
        print(f"anyway-rpc-server: error: {exc}", flush=True)
        return 2
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    threads = args.threads or max((os.cpu_count() or 1), 1)
    bind = args.endpoint
    if args.keys:
        bind = "127.0.0.1:0"  # the kernel picks a free port; the TLS front finds it
        threading.Thread(target=_front, args=(args.endpoint, args.keys), name="tls-front", daemon=True).start()
    print(f"anyway-rpc-server pid={os.getpid()} endpoint={args.endpoint} tls={bool(args.keys)} devices={indices}", flush=True)
    ggml.start_rpc_server(endpoint=bind, cache_dir=args.cache_dir or None, n_threads=threads, device_indices=indices)
    return 1  # start_server only returns on a bind failure


if __name__ == "__main__":
    sys.exit(main())
