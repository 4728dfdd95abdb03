"""The worker's RPC server child process: ggml's RPC backend serving this box's device.

`ggml_backend_rpc_start_server` never returns, and a crash in it must not take the
agent (and its heartbeats) down, so it runs in its own process, started by the agent
once the head has accepted the node, bound only to the address the head reaches it
on. The local tensor cache directory makes a re-load after a re-plan cheap: the head
sends tensor hashes and the worker reads the bytes from disk instead of the network.
It dies with its parent agent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import os
import sys

from appliance.common.process import die_with_parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anyway-rpc-server")
    p.add_argument("--endpoint", required=True, help="host:port to bind")
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
    print(f"anyway-rpc-server pid={os.getpid()} endpoint={args.endpoint} devices={indices}", flush=True)
    ggml.start_rpc_server(
        endpoint=args.endpoint, cache_dir=args.cache_dir or None, n_threads=threads, device_indices=indices
    )
    return 1  # start_server only returns on a bind failure


if __name__ == "__main__":
    sys.exit(main())
