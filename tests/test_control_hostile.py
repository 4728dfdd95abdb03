"""The control plane survives any frame, even from a peer that holds a valid node key (a stolen
box): NaN, numbers beyond a float's range, absurd memory and speed, wrong types, a name that
is not its key's, an RPC endpoint of its own choosing, and floods. Each is dropped (a HELLO
refused with its reason), counted, reported by a rate-limited event, never planned on, and the
head keeps serving and hearing its real worker. One real cluster (real ZeroMQ with CurveZMQ,
real HTTP) for the whole module."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from openai import OpenAI

from appliance import __version__
from appliance.common import protocol as P
from appliance.common.ggml import rpc_protocol_version

from helpers import node_dealer, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(make_module_cluster, tiny_model: Path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    c = make_module_cluster(tiny_model, workers=1)
    c.wait_serving(nodes=1)
    yield c


def hello(who: str, **over: Any) -> dict[str, Any]:
    name = who
    body = {"name": name, "node_id": f"{name}-1", "hostname": name, "protocol": P.PROTOCOL_MAJOR,
            "rpc_protocol": rpc_protocol_version(), "version": __version__, "rpc_port": 50999, "rpc_ready": False,
            "memory": {"total": 8 << 30, "free": 4 << 30, "plannable": 4 << 30}, "speed": 10.0, "data_plane": "plain"}
    body.update(over)
    return body


def ask(c: Any, name: str, frames: list[bytes]) -> P.Message:
    s = node_dealer(c, name)
    try:
        s.send_multipart(frames)
        return P.decode(s.recv_multipart(), allowed=P.HEAD_TYPES)
    finally:
        s.close()


def bad_frames(c: Any) -> float:
    for line in httpx.get(f"{c.url}/metrics").text.splitlines():
        if line.startswith("anyway_control_bad_frames_total "):
            return float(line.split()[1])
    return 0.0


def still_whole(c: Any) -> dict[str, Any]:
    """The head answers, its worker is alive and holds the layers, and it generates."""
    assert c.procs["head"].poll() is None
    r = httpx.get(f"{c.url}/v1/cluster", timeout=10)
    assert r.status_code == 200  # a NaN somewhere would make this a 500
    state = c.wait(lambda s: s["health"]["status"] == "ok", timeout_s=20, what="still serving")
    w1 = next(n for n in state["nodes"] if n["name"] == "w1")
    assert w1["state"] == "alive" and w1["layers"]
    client = OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=60)
    out = client.completions.create(model=state["model"]["id"], prompt="Hi", max_tokens=3, temperature=0)
    assert out.choices[0].text is not None
    return state


@pytest.mark.parametrize("body", [
    pytest.param(b'{"rpc_ready": true, "speed": NaN}', id="nan"),
    pytest.param(b'{"memory": {"total": Infinity}}', id="infinity"),
    pytest.param(b'{"memory": {"total": 1e400}}', id="beyond-float-range"),
    pytest.param(b'{"memory": {"total": ' + b"9" * 4000 + b"}}", id="4000-digit-integer"),
    pytest.param(b"[" * 30_000 + b"]" * 30_000, id="nested"),
])
def test_a_hostile_heartbeat_leaves_the_head_serving(cluster: Any, body: bytes) -> None:
    before = bad_frames(cluster)
    s = node_dealer(cluster, "w1")  # the real worker's own key
    try:
        s.send_multipart([P.PROTOCOL, P.HEARTBEAT, body])
    finally:
        s.close()
    wait_until(lambda: bad_frames(cluster) > before, timeout_s=20, what="the frame to be counted as bad")
    still_whole(cluster)


@pytest.mark.parametrize("name, over, reason", [
    pytest.param("liar", {"memory": {"total": 1 << 50, "free": 1 << 50, "plannable": 1 << 50}}, "more than any box", id="a-petabyte"),
    pytest.param("liar", {"speed": 1e300}, "speed", id="absurd-speed"),
    pytest.param("liar", {"memory": {"total": "all of it"}}, "byte count", id="wrong-type"),
    pytest.param("liar", {"devices": [{"name": "GPU", "total_bytes": 1 << 62}]}, "more than any box", id="absurd-gpu"),
    pytest.param("mallory", {"name": "w1"}, "cannot announce a node named 'w1'", id="another-nodes-name"),
    pytest.param("nat", {"rpc_advertise": "203.0.113.5:22"}, "--node-rpc nat=HOST:PORT", id="advertised-endpoint"),
])
def test_absurd_hello_values_do_not_enter_the_plan(cluster: Any, name: str, over: dict[str, Any], reason: str) -> None:
    reply = ask(cluster, name, P.encode(P.HELLO, hello(name, **over)))
    assert reply.type == P.REFUSE and reason in reply.body["reason"], reply.body
    state = still_whole(cluster)
    assert {n["name"] for n in state["nodes"] if n.get("layers")} == {"w1"}
    assert {n["name"] for n in state["nodes"] if n["state"] != "refused"} == {"w1"}
    refused = next(n for n in state["nodes"] if n["name"] == name)
    assert refused["state"] == "refused" and reason.split("'")[0] in refused["reason"]


def test_a_sane_hello_from_a_keyed_node_still_joins(cluster: Any) -> None:
    """The checks refuse lies, not nodes: the same HELLO with real figures is welcomed."""
    reply = ask(cluster, "honest", P.encode(P.HELLO, hello("honest")))
    assert reply.type == P.WELCOME and reply.body["rpc_host"] == "127.0.0.1"  # where its connection comes from


def test_a_flood_is_dropped_and_reported_sparingly(cluster: Any) -> None:
    before_bad = bad_frames(cluster)
    last_id = httpx.get(f"{cluster.url}/v1/cluster").json()["events_last_id"]
    s = node_dealer(cluster, "flooder")
    t0 = time.monotonic()
    try:
        s.send_multipart(P.encode(P.HELLO, hello("flooder")))
        for _ in range(3000):  # well-formed heartbeats, far faster than any node sends them
            s.send_multipart(P.encode(P.HEARTBEAT, {"rpc_ready": False}))
    finally:
        s.close()
    wait_until(lambda: bad_frames(cluster) >= before_bad + 2000, timeout_s=30, what="the flood to be counted")
    elapsed = time.monotonic() - t0
    events = httpx.get(f"{cluster.url}/v1/events", params={"since": last_id}).json()["events"]
    reports = [e for e in events if e["kind"] == "bad_frame"]
    # One report per BAD_FRAME_LOG_INTERVAL_S (1 s) at most, however many frames came.
    assert 1 <= len(reports) <= elapsed + 2, (len(reports), elapsed)
    assert all("flood" in e["message"] for e in reports)
    still_whole(cluster)


def test_staging_requests_have_their_own_budget(cluster: Any) -> None:
    """A worker pre-staging at its default rate (40 MiB/s in 512 KiB pieces: 80 FETCH/s) sends
    more messages than the control budget (50/s). FETCHes draw on their own budget (bytes/s,
    STAGING_SERVE_BYTES_PER_S), so a burst of them does not drain the node's control budget:
    its HELLO right after 2,000 of them is still answered (with one shared budget, the first 200
    drained it and the HELLO was dropped as a flood). Every FETCH refused is counted."""
    before_bad = bad_frames(cluster)
    s = node_dealer(cluster, "stager")
    try:
        for k in range(2000):  # far more than the control burst (200) and the staging burst (32)
            s.send_multipart(P.encode(P.FETCH, {"hash": "0" * 32, "offset": k, "length": 1}))
        s.send_multipart(P.encode(P.HELLO, hello("stager")))
        deadline = time.monotonic() + 10
        reply = None
        while time.monotonic() < deadline:  # the answers to FETCH (if any) come first
            reply = P.decode(s.recv_multipart(), allowed=P.HEAD_TYPES)
            if reply.type in (P.WELCOME, P.REFUSE):
                break
        assert reply is not None and reply.type == P.WELCOME, reply
    finally:
        s.close()
    # Not a member when they came (or past the staging burst): each is dropped and counted.
    wait_until(lambda: bad_frames(cluster) >= before_bad + 2000, timeout_s=30, what="the FETCHes to be counted")
    still_whole(cluster)
