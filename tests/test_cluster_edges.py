"""Edges of the cluster's life on real processes: head restart, not enough capacity,
wrong keys, version-mismatched nodes, garbage on the control plane, API keys."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from appliance.common import protocol as P
from appliance.common.keys import add_node, init_keys
from appliance.core.planner import MIB, NodeCapacity, PlanError, make_plan
from appliance.common.modelfile import load_profile

from conftest import N_CTX
from helpers import node_dealer, wait_until

pytestmark = pytest.mark.slow


def chat_ok(url: str, api_key: str = "x") -> str:
    c = OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)
    mid = c.models.list().data[0].id
    r = c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
    assert r.choices[0].message.content
    return r.choices[0].message.content


def layered(state: dict[str, Any]) -> set[str]:
    return {n["name"] for n in state["nodes"] if n.get("layers")}


def test_head_restart_rebuilds_membership(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(tiny_model, workers=2)
    c.wait_serving(nodes=2)
    first = chat_ok(c.url)
    c.procs["head"].send_signal(signal.SIGKILL)
    c.procs["head"].wait(timeout=10)
    c.restart("head")  # a fresh head with no stored state
    state = c.wait(lambda s: s["health"]["status"] == "ok" and layered(s) == {"w1", "w2"},
                   timeout_s=90, what="workers re-announced to the new head")
    assert state["uptime_s"] < 90
    assert chat_ok(c.url) == first


def _cap_for(profile_path: Path, n_nodes: int) -> int:
    """Smallest per-node memory with which `n_nodes` equal workers hold the model."""
    prof = load_profile(profile_path)
    lo, hi = 10 * MIB, 4096 * MIB
    while hi - lo > MIB:
        mid = (lo + hi) // 2
        nodes = [NodeCapacity(name=f"w{i}", free_bytes=mid, endpoint=f"h:{i}") for i in range(n_nodes)]
        try:
            make_plan(nodes=nodes, profile=prof, n_ctx=N_CTX * 4)
            hi = mid
        except PlanError:
            lo = mid
    return hi


def test_not_enough_capacity_gives_503_then_recovers(make_cluster, demo_model: Path) -> None:  # type: ignore[no-untyped-def]
    cap = _cap_for(demo_model, 3) + 4 * MIB
    assert cap < _cap_for(demo_model, 2), "two capped workers must not hold the model"
    c = make_cluster(demo_model, workers=3, memory=str(cap))
    c.wait_serving(nodes=3)
    c.procs["w3"].send_signal(signal.SIGKILL)
    state = c.wait(lambda s: s["health"]["status"] == "degraded", timeout_s=30, what="degraded")
    assert "does not fit" in state["health"]["reason"]
    health = httpx.get(f"{c.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    r = httpx.post(f"{c.url}/v1/chat/completions", json={
        "model": state["model"]["id"], "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    assert r.status_code == 503
    assert r.headers["Retry-After"].isdigit()
    err = r.json()["error"]
    assert err["code"] == "cluster_degraded" and "does not fit" in err["message"]
    c.restart("w3")
    c.wait(lambda s: s["health"]["status"] == "ok" and layered(s) == {"w1", "w2", "w3"},
           timeout_s=60, what="recovered when w3 returned")
    chat_ok(c.url)


@pytest.mark.parametrize("which", ["other-cluster", "unknown-client-key"])
def test_worker_with_wrong_keys_cannot_join(make_cluster, tiny_model: Path, tmp_path: Path, which: str) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(tiny_model, workers=1)
    c.wait_serving(nodes=1)
    other = init_keys(tmp_path / "other-cluster")
    bundle = add_node(other, "intruder")
    if which == "unknown-client-key":
        # The head's public key is right, but this node's key is not on the head's allow-list.
        (bundle / "server.key").write_bytes((c.keys / "server.key").read_bytes())
    c.start_worker("intruder", extra=["--keys", str(bundle)])
    expect = "unknown cluster key" if which == "unknown-client-key" else "CURVE handshake failed"

    def refused(_: dict[str, Any]) -> bool:
        events = httpx.get(f"{c.url}/v1/events").json()["events"]
        return any(e["kind"] == "refused" and expect in e["message"] for e in events)

    c.wait(refused, timeout_s=30, what="refusal event")
    state = c.cluster_state()
    assert state is not None and [n["name"] for n in state["nodes"]] == ["w1"]
    wait_until(lambda: "head_not_answering" in c.logs["intruder"].read_text(), timeout_s=15,
               what="the intruder to log head_not_answering", interval_s=0.2)
    log = c.logs["intruder"].read_text()
    assert "head_not_answering" in log and "cluster keys" in log
    assert "accepted_by_head" not in log


def test_version_mismatched_node_is_refused_with_reason(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(tiny_model, workers=1)
    c.wait_serving(nodes=1)
    s = node_dealer(c, "oldbox")
    try:
        s.send_multipart(P.encode(P.HELLO, {
            "name": "oldbox", "node_id": "x1", "protocol": P.PROTOCOL_MAJOR, "rpc_protocol": "3.0.0",
            "version": "0.0.1", "rpc_port": 50052, "rpc_host": "127.0.0.1",
        }))
        reply = P.decode(s.recv_multipart(), allowed=P.HEAD_TYPES)
    finally:
        s.close()
    assert reply.type == P.REFUSE and "ggml RPC protocol 3.0.0" in reply.body["reason"]
    state = c.cluster_state()
    assert state is not None
    old = next(n for n in state["nodes"] if n["name"] == "oldbox")
    assert old["state"] == "refused" and "RPC protocol" in old["reason"] and old["versions"]["rpc_protocol"] == "3.0.0"
    assert layered(state) == {"w1"}


def test_garbage_on_the_control_plane_is_dropped(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(tiny_model, workers=1)
    c.wait_serving(nodes=1)
    s = node_dealer(c, "w9")  # a node holding a valid key
    garbage = [
        [b"hello"],
        [P.PROTOCOL, b"NOPE", b"{}"],
        [P.PROTOCOL, P.HELLO, b"\xff\xfe\x00"],
        [P.PROTOCOL, P.HEARTBEAT, b"[1, 2]"],
        [P.PROTOCOL, P.HELLO, b'{"name": 5}'],
        [os.urandom(64), os.urandom(64), os.urandom(64), os.urandom(64)],
    ]
    try:
        for frames in garbage:
            s.send_multipart(frames)
    finally:
        s.close()
    # Raw bytes from something that does not speak ZMTP at all.
    with socket.create_connection(("127.0.0.1", c.control_port), timeout=5) as raw:
        raw.sendall(os.urandom(4096))

    def bad_frames() -> float:
        for line in httpx.get(f"{c.url}/metrics").text.splitlines():
            if line.startswith("anyway_control_bad_frames_total "):
                return float(line.split()[1])
        return 0.0

    bad = wait_until(lambda: (n := bad_frames()) >= 4 and n, timeout_s=20,
                     what="anyway_control_bad_frames_total >= 4", interval_s=0.3)
    assert bad >= 4
    assert c.procs["head"].poll() is None
    state = c.wait(lambda st: st["health"]["status"] == "ok", timeout_s=20, what="still serving")
    assert layered(state) == {"w1"}
    chat_ok(c.url)


def test_api_key_protects_the_api_and_admin_actions_need_the_admin_key(make_cluster, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "inference.key").write_text("s3cret\n")
    (tmp_path / "admin.key").write_text("adm1n-s3cret\n")
    c = make_cluster(tiny_model, workers=1, head_args=["--api-key-file", str(tmp_path / "inference.key"),
                                                        "--admin-key-file", str(tmp_path / "admin.key")])

    def healthy() -> bool:
        try:
            return httpx.get(f"{c.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s=90, what="/health to answer 200", interval_s=0.3)
    r = httpx.get(f"{c.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{c.url}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    chat_ok(c.url, api_key="s3cret")
    inference, admin = {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer adm1n-s3cret"}
    # Admin endpoints refuse the inference key (403), and no key or a wrong one (401) ...
    for path in ("/v1/nodes/w1/drain", "/v1/nodes/w1/uncordon", "/v1/reload"):
        r = httpx.post(f"{c.url}{path}", headers=inference, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required", path
        assert httpx.post(f"{c.url}{path}", timeout=10).status_code == 401
        assert httpx.post(f"{c.url}{path}", headers={"Authorization": "Bearer adm1n"}, timeout=10).status_code == 401
    # ... and nothing was reloaded or drained by them.
    events = httpx.get(f"{c.url}/v1/events", headers=admin).json()["events"]
    assert not any(e["kind"] in ("reload", "drain", "uncordon") for e in events)
    # The admin key reads and acts.
    assert httpx.get(f"{c.url}/v1/cluster", headers=admin).status_code == 200
    r = httpx.post(f"{c.url}/v1/nodes/w1/uncordon", headers=admin, timeout=10)
    assert r.status_code == 200 and r.json()["node"] == "w1"


def test_keys_never_come_from_the_command_line(tiny_model: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "appliance", "head", "--model", str(tiny_model), "--insecure",
                          "--api-key", "s3cret"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--api-key-file" in out.stderr and "ANYWAY_API_KEY" in out.stderr
    out = subprocess.run([sys.executable, "-m", "appliance", "head", "--model", str(tiny_model), "--insecure",
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "without an inference key" in out.stderr


def test_a_killed_idle_worker_leaves_the_plan_before_heartbeats_expire(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """No request runs, so no engine notices; the head sees the control connection drop, finds
    the RPC port refusing connections and re-plans long before the heartbeat detector would
    (here heartbeats every 2 s: dead only after 20 s)."""
    import psutil

    c = make_cluster(tiny_model, workers=2, heartbeat=2.0)
    c.wait_serving(nodes=2, timeout_s=120)
    last_id = c.cluster_state()["events_last_id"]
    agent = psutil.Process(c.procs["w1"].pid)
    for p in [agent, *agent.children(recursive=True)]:
        p.kill()
    st = c.wait(lambda s: layered(s) == {"w2"} and s["health"]["status"] == "ok", timeout_s=15, what="plan without w1")
    evs = httpx.get(f"{c.url}/v1/events", params={"since": last_id}).json()["events"]
    w1 = [e for e in evs if e["node"] == "w1"]
    assert any(e["kind"] == "suspect" and "refused" in e["message"] for e in w1), w1
    assert not any(e["kind"] == "dead" for e in w1), "the heartbeat detector, not the probe, took w1 out"
    assert next(n for n in st["nodes"] if n["name"] == "w1")["state"] != "alive"
    assert chat_ok(c.url)
    # Back as a new process: probed, taken back in.
    c.restart("w1")
    c.wait(lambda s: layered(s) == {"w1", "w2"}, timeout_s=60, what="w1 back in the plan")


def test_a_hung_worker_that_stalls_a_stream_leaves_the_plan_before_it_is_dead(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP (a hung box: no TCP reset, the port still accepts) mid-stream. The engine stalls
    on it; once it is also silent for SUSPECT_AFTER_S it leaves the plan (`stall`), long before
    the heartbeat detector would call it dead (heartbeat 1 s: suspect at 4 s, dead at 10 s)."""
    import psutil

    c = make_cluster(tiny_model, workers=2, heartbeat=1.0)
    c.wait_serving(nodes=2, timeout_s=120)
    last_id = c.cluster_state()["events_last_id"]
    client = OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=120)
    mid = client.models.list().data[0].id
    prompt = "The history of the printing press"
    want = client.completions.create(model=mid, prompt=prompt, max_tokens=80, temperature=0).choices[0].text
    agent = psutil.Process(c.procs["w1"].pid)
    tree = [agent, *agent.children(recursive=True)]
    parts = []
    try:
        stream = client.completions.create(model=mid, prompt=prompt, max_tokens=80, temperature=0, stream=True)
        for i, chunk in enumerate(stream):
            parts.append(chunk.choices[0].text if chunk.choices else "")
            if i == 10:
                for p in tree:
                    p.suspend()
        evs = httpx.get(f"{c.url}/v1/events", params={"since": last_id}).json()["events"]
    finally:
        for p in tree:
            p.resume()
    assert "".join(parts) == want
    kinds = [(e["kind"], e["node"]) for e in evs]
    assert ("stall", "w1") in kinds, kinds
    replan = next(i for i, e in enumerate(evs) if e["kind"] == "replan" and "w1:" not in e["message"])
    assert ("dead", "w1") not in kinds[:replan], "the heartbeat detector, not the stall rule, took w1 out"
    c.wait(lambda s: layered(s) == {"w1", "w2"}, timeout_s=60, what="w1 back in the plan after SIGCONT")
