"""The data plane: llama.cpp's RPC server never faces the network unauthenticated.

Real RPC servers (`python -m appliance.worker.rpc_server`), real TLS (OpenSSL through
Python's ssl), and ggml's own RPC client as the peer: "no RPC answer" means what it means
for llama.cpp — the client cannot even count the server's devices. The first group runs on
loopback; the second puts the workers and an attacker in network namespaces on a bridge, a
LAN with the head, so that a worker's loopback is really its own (root needed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
from openai import OpenAI

from appliance.cli.up import free_port
from appliance.common.dataplane import TunnelSpec
from appliance.common.keys import ISSUED_DIR, SERVER, add_node, init_keys, load_allow_list
from appliance.common.netprobe import Reach, probe_tcp


ROOT = Path(__file__).resolve().parent.parent

CLIENT = """
import json, sys
from appliance.common import ggml
from appliance.common.dataplane import TunnelSpec, open_tunnels
endpoints = sys.argv[1].split(",")
if len(sys.argv) > 2:
    endpoints = open_tunnels(TunnelSpec.from_json(open(sys.argv[2]).read()), endpoints)
print(json.dumps({"devices": ggml.register_rpc_servers(endpoints)}), flush=True)
"""


def ggml_client(endpoint: str, *, tunnels: Path | None = None, wrapper: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """llama.cpp's RPC client asks `endpoint` how many devices it serves (through a TLS tunnel
    described by `tunnels`, if given). ggml aborts the process when it gets no valid answer."""
    cmd = [*(wrapper or []), sys.executable, "-c", CLIENT, endpoint, *([str(tunnels)] if tunnels else [])]
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def answered(out: subprocess.CompletedProcess[str]) -> bool:
    return out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1])["devices"] >= 1


class Server:
    """One RPC server child as a worker agent starts it."""

    def __init__(self, endpoint: str, *, keys: Path | None, wrapper: list[str] | None = None) -> None:
        self.endpoint = endpoint
        cmd = [*(wrapper or []), sys.executable, "-m", "appliance.worker.rpc_server", "--endpoint", endpoint,
               "--threads", "1", *(["--keys", str(keys)] if keys else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # its first lines; ends when the TLS front says it listens
            if "TLS 1.3 on" in line:
                break
        else:
            raise AssertionError(f"RPC server exited ({self.proc.wait()})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = init_keys(tmp_path_factory.mktemp("keys") / "cluster")
    add_node(d, "w1")
    add_node(d, "w2")
    return d


def tunnel_file(keys: Path, tmp: Path, endpoint: str, *, pin: str, me: Path | None = None) -> Path:
    """A TunnelSpec: reach `endpoint` as `me` (default the head), pinning node `pin`'s certificate."""
    spec = TunnelSpec(head_key_file=str(me or keys / f"{SERVER}.key_secret"), peers={endpoint: load_allow_list(keys)[pin]})
    path = tmp / f"tunnel-{pin}-{time.monotonic_ns()}.json"
    path.write_text(spec.to_json())
    return path


@pytest.fixture(scope="module")
def w1_server(cluster_keys: Path) -> Iterator[Server]:
    # 127.0.0.2 is loopback too, but not the C server's 127.0.0.1: the two listeners are told apart.
    server = Server(f"127.0.0.2:{free_port()}", keys=cluster_keys / ISSUED_DIR / "w1")
    yield server
    server.stop()


def test_the_c_server_listens_on_loopback_only_and_tls_faces_the_endpoint(w1_server: Server) -> None:
    listening = sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process(w1_server.proc.pid).net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN)
    host, port = w1_server.endpoint.split(":")
    assert len(listening) == 2 and (host, int(port)) in listening, listening
    (c_host, _c_port), = [x for x in listening if x != (host, int(port))]
    assert c_host == "127.0.0.1"  # the unauthenticated C server: the box's loopback, nothing else


def test_a_peer_without_the_key_gets_no_rpc_answer(w1_server: Server) -> None:
    out = ggml_client(w1_server.endpoint)
    assert not answered(out) and out.returncode != 0
    assert "malformed response" in out.stderr or "Failed to connect" in out.stderr, out.stderr[-500:]


def test_the_head_with_its_key_gets_answers(w1_server: Server, cluster_keys: Path, tmp_path: Path) -> None:
    out = ggml_client(w1_server.endpoint, tunnels=tunnel_file(cluster_keys, tmp_path, w1_server.endpoint, pin="w1"))
    assert answered(out), out.stderr[-800:]


def test_another_nodes_key_does_not_open_the_rpc_server(w1_server: Server, cluster_keys: Path, tmp_path: Path) -> None:
    """A stolen worker key is not the head's: it cannot drive another worker's RPC server."""
    stolen = cluster_keys / ISSUED_DIR / "w2" / "node.key_secret"
    out = ggml_client(w1_server.endpoint, tunnels=tunnel_file(cluster_keys, tmp_path, w1_server.endpoint, pin="w1", me=stolen))
    assert not answered(out)


def test_the_head_refuses_a_server_that_is_not_the_pinned_node(w1_server: Server, cluster_keys: Path, tmp_path: Path) -> None:
    """The head sends weights and activations only to the node the plan names."""
    out = ggml_client(w1_server.endpoint, tunnels=tunnel_file(cluster_keys, tmp_path, w1_server.endpoint, pin="w2"))
    assert not answered(out)
    assert "dataplane_connect_failed" in out.stderr or "dataplane_peer_refused" in out.stderr


def test_another_clusters_head_is_refused(w1_server: Server, cluster_keys: Path, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other")
    out = ggml_client(w1_server.endpoint, tunnels=tunnel_file(cluster_keys, tmp_path, w1_server.endpoint, pin="w1",
                                                              me=other / f"{SERVER}.key_secret"))
    assert not answered(out)


def test_a_dead_rpc_server_refuses_connections_at_once(cluster_keys: Path) -> None:
    """What the head's fast failure detection relies on: the TLS front dies with the server,
    so the endpoint refuses (not times out) the moment the server process is gone."""
    import asyncio

    server = Server(f"127.0.0.2:{free_port()}", keys=cluster_keys / ISSUED_DIR / "w2")
    host, port = server.endpoint.split(":")
    assert asyncio.run(probe_tcp(host, int(port), 2.0)) == Reach.OPEN
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    assert asyncio.run(probe_tcp(host, int(port), 2.0)) == Reach.REFUSED


# ----------------------------------------------------------------- on a LAN of namespaces
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture(scope="module")
def lan(make_module_cluster, tiny_model: Path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    from netlab import BridgeLab

    lab = BridgeLab(names=("w1", "w2", "mallory")).start()
    try:
        c = make_module_cluster(tiny_model, workers=0, heartbeat=2.0, data_plane="tls", control_bind_host="0.0.0.0")
        for name in ("w1", "w2"):
            host = lab.hosts[name]
            c.start_worker(name, extra=["--head", f"tcp://{lab.head_address}:{c.control_port}", "--rpc-host", host.address],
                           wrapper=host.ns())
        c.wait_serving(nodes=2, timeout_s=180)
        yield c, lab
    finally:
        lab.stop()


@pytest.mark.slow
@needs_root
def test_on_the_lan_the_cluster_serves_over_tls(lan: Any) -> None:
    c, lab = lan
    state = c.cluster_state()
    endpoints = {n["name"]: n["rpc_endpoint"] for n in state["nodes"]}
    assert endpoints["w1"].startswith(lab.hosts["w1"].address + ":")
    assert endpoints["w2"].startswith(lab.hosts["w2"].address + ":")
    client = OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=client.models.list().data[0].id,
                                       messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    assert r.choices[0].message.content


def _backend_port(host: Any) -> int:
    """The C server's port inside a worker's namespace: the one listening on its 127.0.0.1."""
    out = subprocess.run(host.ns("ss", "-Hltn"), capture_output=True, text=True, check=True).stdout
    ports = [int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.split()[3].startswith("127.0.0.1:")]
    assert ports, out
    return ports[0]


@pytest.mark.slow
@needs_root
def test_on_the_lan_a_non_head_peer_gets_no_rpc_answer(lan: Any, tmp_path: Path) -> None:
    c, lab = lan
    mallory, w1 = lab.hosts["mallory"], lab.hosts["w1"]
    endpoint = next(n["rpc_endpoint"] for n in c.cluster_state()["nodes"] if n["name"] == "w1")
    # Plain ggml RPC from another box on the LAN: nothing.
    out = ggml_client(endpoint, wrapper=mallory.ns())
    assert not answered(out), out.stdout
    # The C server itself is not on the LAN at all.
    backend = _backend_port(w1)
    probe = subprocess.run(mallory.ns(sys.executable, "-c", f"import socket; socket.create_connection(('{w1.address}', "
                                      f"{backend}), timeout=3)"), capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and ("refused" in probe.stderr.lower() or "timed out" in probe.stderr.lower())
    # A stolen worker key (w2's) is not the head's.
    stolen = c.node_keys("w2") / "node.key_secret"
    out = ggml_client(endpoint, tunnels=tunnel_file(c.keys, tmp_path, endpoint, pin="w1", me=stolen), wrapper=mallory.ns())
    assert not answered(out)


@pytest.mark.slow
@needs_root
def test_on_the_lan_a_killed_worker_leaves_the_plan_through_tls_at_once(lan: Any) -> None:
    """Fast failure detection survives the TLS front: the endpoint refuses as soon as the
    worker's processes are gone, long before heartbeats (every 2 s here: dead after 20 s)."""
    c, _lab = lan
    last_id = c.cluster_state()["events_last_id"]
    agent = psutil.Process(c.procs["w1"].pid)
    for p in [agent, *agent.children(recursive=True)]:
        p.kill()
    t0 = time.monotonic()
    c.wait(lambda s: {n["name"] for n in s["nodes"] if n.get("layers")} == {"w2"} and s["health"]["status"] == "ok",
           timeout_s=15, what="plan without w1")
    assert time.monotonic() - t0 < 15
    evs = httpx.get(f"{c.url}/v1/events", params={"since": last_id}).json()["events"]
    w1 = [e for e in evs if e["node"] == "w1"]
    assert any(e["kind"] == "suspect" and "refused" in e["message"] for e in w1), w1
    assert not any(e["kind"] == "dead" for e in w1)
    c.restart("w1")
    c.wait(lambda s: {n["name"] for n in s["nodes"] if n.get("layers")} == {"w1", "w2"}, timeout_s=90,
           what="w1 back in the plan")
