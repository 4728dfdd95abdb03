"""The engine process's main loop: load the model, then serve the head's socket.

Started by the head (`python -m appliance.engine ...`), one per plan generation. It
connects a DEALER to the head's ipc:// ROUTER with its generation as identity, loads
the model over the plan's RPC workers (reporting progress), and then alternates
between draining the socket and one scheduling step of the `Engine`. It dies with
the head (PR_SET_PDEATHSIG); a SIGTERM or a `stop` message ends it; ggml may abort it
at any time (a worker vanished), which is why it is its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import zmq

from appliance.common import engine_protocol as ep
from appliance.common import logs
from appliance.common.config import EngineTiming
from appliance.common.dataplane import TunnelSpec
from appliance.common.process import die_with_parent
from appliance.core.planner import Plan
from appliance.engine.drafting import DRAFT_MAX_TOKENS
from appliance.engine.engine import Engine
from appliance.engine.lanes import Lanes, lane_batches

log = logs.get("engine")


def run(args: argparse.Namespace) -> int:
    logs.setup(proc="engine")
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    heartbeat_s = float(args.heartbeat_interval)
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, args.identity.encode())
    sock.connect(args.connect)

    def send(msg: ep.Message) -> None:
        sock.send(ep.encode(msg))

    with open(args.plan) as fh:
        plan = Plan.from_dict(json.load(fh))
    tunnels = None
    if args.tunnels:
        with open(args.tunnels) as fh:
            tunnels = TunnelSpec.from_json(fh.read())
    send(ep.Hello(pid=os.getpid()))
    sizes = lane_batches(args.max_batch, plan.lanes)  # the plan reserved their compute buffers
    if len(sizes) > 1:
        # Lanes share ggml's one RPC connection per worker: no per-device graph memory (lanes.py).
        os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = "1"
    t0 = time.monotonic()
    engines: list[Engine] = []
    try:
        for size in sizes:
            first = engines[0] if engines else None
            # Later lanes share the first's weights (and draft weights); each makes its own contexts.
            eng = Engine(model_path=args.model, plan=plan, n_ctx_seq=args.n_ctx, max_batch=size,
                         n_threads=args.threads, send=send, model=first.model if first else None,
                         tunnels=tunnels, draft_max=args.draft_max, draft_model_path=args.draft_model or "",
                         draft_min=args.draft_min, draft_weights=first.draft_weights if first else None)
            eng.load()
            engines.append(eng)
    except Exception as exc:  # noqa: BLE001 - reported to the head, then exit
        send(ep.Failed(error=str(exc)))
        sock.close(linger=1000)
        return 3
    send(ep.Ready(n_ctx_seq=engines[0].n_ctx_seq, max_batch=args.max_batch, load_s=round(time.monotonic() - t0, 3)))
    if len(engines) == 1:
        return _serve_one(sock, engines[0], send, heartbeat_s)
    return _serve_lanes(sock, Lanes(engines), send, heartbeat_s)


def _messages(sock: zmq.Socket) -> list[ep.ToEngine]:  # type: ignore[type-arg]
    out = []
    while True:
        try:
            raw = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return out
        try:
            out.append(ep.decode(raw, allowed=ep.TO_ENGINE))
        except ep.BadMessage as exc:
            log.warning("bad_message_dropped", size=len(raw), reason=str(exc))


def _serve_one(sock: zmq.Socket, eng: Engine, send: Any, heartbeat_s: float) -> int:  # type: ignore[type-arg]
    """One context: the socket and the decode steps on this thread."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last_hb = 0.0

    def beat() -> None:
        """A heartbeat when one is due: between steps, and after each pass inside a step (a
        resume of a long answer on a big model is a prefill of many passes, minutes on a CPU:
        the head must see it progress, not take it for a stalled engine)."""
        nonlocal last_hb
        now = time.monotonic()
        if now - last_hb >= heartbeat_s:
            last_hb = now
            send(ep.Heartbeat(active=len(eng.active), queued=len(eng.queue), steps=eng.steps, tokens=eng.tokens_out,
                              prefilled=eng.prefilled, decodes=eng.decodes, drafted=eng.drafted,
                              accepted=eng.accepted))

    eng.on_decode = beat
    while True:
        events = dict(poller.poll(0 if eng.busy else int(heartbeat_s * 1000)))
        if sock in events:
            for msg in _messages(sock):
                if isinstance(msg, ep.Submit):
                    eng.submit(msg)
                elif isinstance(msg, ep.Cancel):
                    eng.cancel(msg.id)
                elif isinstance(msg, ep.Stop):
                    sock.close(linger=500)
                    return 0
        if eng.busy:
            eng.step()
        beat()


def _serve_lanes(sock: zmq.Socket, lanes: Lanes, send: Any, heartbeat_s: float) -> int:  # type: ignore[type-arg]
    """Several contexts, one thread each (lanes.py); this thread routes requests and results."""
    lanes.start()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(lanes.wake_r, zmq.POLLIN)
    last_hb = 0.0
    while True:
        events = dict(poller.poll(int(heartbeat_s * 1000)))
        if sock in events:
            for msg in _messages(sock):
                if isinstance(msg, ep.Submit):
                    lanes.submit(msg)
                elif isinstance(msg, ep.Cancel):
                    lanes.cancel(msg.id)
                    lanes.finished(msg.id)
                elif isinstance(msg, ep.Stop):
                    lanes.stop()
                    sock.close(linger=500)
                    return 0
        for out in lanes.drain():
            if isinstance(out, (ep.Done, ep.Error)):
                lanes.finished(out.id)
            send(out)
            if isinstance(out, ep.Failed):
                sock.close(linger=1000)
                return 3
        now = time.monotonic()
        if now - last_hb >= heartbeat_s:
            last_hb = now
            send(ep.Heartbeat(**lanes.stats()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anyway-engine", description="Anyway engine process (started by the head)")
    p.add_argument("--connect", required=True, help="head's engine socket (ipc://...)")
    p.add_argument("--identity", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True, help="plan JSON file")
    p.add_argument("--n-ctx", type=int, required=True, help="context per sequence")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tunnels", default="", help="JSON: which plan endpoints are TLS and the certificates they pin")
    p.add_argument("--draft-max", type=int, default=DRAFT_MAX_TOKENS,
                   help="most drafted tokens checked per sequence and step (0: no speculative decoding)")
    p.add_argument("--draft-min", type=int, default=0,
                   help="check at least this many drafted tokens whenever there are drafts (overrides the adaptive length)")
    p.add_argument("--draft-model", default="", help="small GGUF model with the same vocabulary that drafts tokens")
    p.add_argument(
        "--heartbeat-interval", type=float, default=EngineTiming().ENGINE_HEARTBEAT_INTERVAL_S,
        help="seconds between progress heartbeats to the head",
    )
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
