"""The head's RPC probes before an engine starts, against real sockets on loopback.

ggml's RPC server accepts one client at a time (listen backlog 1): while it still serves
the previous engine, new connections queue and then go unanswered. A healthy server that
is a moment late must not be suspected; one that never answers, or refuses, must be.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from test_membership import hello

from appliance.common.config import HeartbeatTiming, RecoveryTiming, Timing
from appliance.core.membership import Membership
from appliance.core.planner import Assignment, Plan
from appliance.head.probe import RpcProber


def busy_server() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: new connections go unanswered."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(srv.getsockname())
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.1)
    return srv, fillers


def prober_for(endpoint: str, *, grace_s: float) -> tuple[RpcProber, Membership, Plan, list]:
    t = Timing()
    m = Membership(timing=t.heartbeat, rpc_protocol="7.0.0", package_version="0.1.0")
    host, port = endpoint.rsplit(":", 1)
    m.hello(identity=b"a", body=hello(rpc_host=host, rpc_port=int(port)), peer_address=host, now=0.0)
    events: list = []
    p = RpcProber(membership=m, heartbeat=HeartbeatTiming(), on_events=events.extend, plans=lambda: [],
                  recovery=RecoveryTiming(RPC_PROBE_TIMEOUT_S=0.2, RPC_START_PROBE_GRACE_S=grace_s))
    plan = Plan(assignments=(Assignment(node="w1", endpoint=endpoint, is_head=False, start=0, end=4, weight_bytes=1,
                                        kv_bytes=0, reserve_bytes=0, extra_bytes=0, free_bytes=1),),
                n_layers=4, n_ctx=16, strategy="memory", output_node="w1")
    return p, m, plan, events


def test_a_server_that_answers_within_the_grace_is_not_suspected() -> None:
    srv, fillers = busy_server()
    endpoint = "%s:%d" % srv.getsockname()

    def drain_later() -> None:  # the previous engine leaves; the server accepts again
        time.sleep(0.6)
        srv.settimeout(0.2)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                srv.accept()[0].close()
            except OSError:
                pass

    threading.Thread(target=drain_later, daemon=True).start()
    p, m, plan, events = prober_for(endpoint, grace_s=2.5)
    assert asyncio.run(p.before_start(plan)) is True
    assert m.nodes["w1"].state.value != "suspect" and not events
    srv.close()
    for c in fillers:
        c.close()


@pytest.mark.parametrize("refuse", [pytest.param(False, id="never-answers"), pytest.param(True, id="refused")])
def test_a_server_that_never_answers_or_refuses_is_suspected(refuse: bool) -> None:
    if refuse:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        endpoint = "%s:%d" % s.getsockname()
        s.close()  # nothing listens there
        srv, fillers = None, []
    else:
        srv, fillers = busy_server()
        endpoint = "%s:%d" % srv.getsockname()
    p, m, plan, events = prober_for(endpoint, grace_s=0.8)
    t0 = time.monotonic()
    assert asyncio.run(p.before_start(plan)) is False
    took = time.monotonic() - t0
    assert m.nodes["w1"].state.value == "suspect"
    assert any("refused" in e.message if refuse else "did not answer" in e.message for e in events)
    assert took < 0.5 if refuse else 0.5 <= took < 2.0  # refused: at once; silent: after the grace
    if srv is not None:
        srv.close()
    for c in fillers:
        c.close()
