"""Self-stabilization on a real cluster: workers die, hang and come back; the engine crashes;
the head restarts; a streaming answer in flight keeps streaming and is unchanged.

Three real worker agents (each with its own ggml RPC server on loopback TCP) hold the
demo model; faults are real signals to real processes: SIGKILL (unplugged box),
SIGSTOP of the agent and its RPC server (hung box), SIGKILL of the engine process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil
import pytest
from helpers import engine_pid, served_model
from openai import OpenAI

from appliance.cli.up import LocalCluster

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
N_TOKENS = 160
KILL_AFTER_CHUNKS = 25


@pytest.fixture(scope="module")
def cluster(make_module_cluster: Any, demo_model: Path) -> LocalCluster:
    c = make_module_cluster(demo_model, workers=3)
    c.wait_serving(nodes=3)
    return c


@pytest.fixture(scope="module")
def expected(reference, demo_model: Path) -> str:  # type: ignore[no-untyped-def]
    text, n = reference.chat(demo_model, MESSAGES, N_TOKENS)
    assert n == N_TOKENS
    return text


def stream_with_fault(url: str, fault: Callable[[], None]) -> tuple[str, str]:
    c = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=180)
    stream = c.chat.completions.create(
        model=served_model(url), messages=MESSAGES, max_tokens=N_TOKENS, temperature=0, stream=True
    )
    parts, finish = [], ""
    for i, chunk in enumerate(stream):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if i == KILL_AFTER_CHUNKS:
            fault()
    return "".join(parts), finish


def layered(state: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {n["name"]: tuple(n["layers"]) for n in state["nodes"] if n.get("layers")}


def node_state(state: dict[str, Any], name: str) -> str:
    return next(n["state"] for n in state["nodes"] if n["name"] == name)


def worker_tree(c: LocalCluster, name: str) -> list[psutil.Process]:
    agent = psutil.Process(c.procs[name].pid)
    return [agent, *agent.children(recursive=True)]


def test_sigkill_worker_mid_stream(cluster: LocalCluster, expected: str) -> None:
    victim = "w2"
    text, finish = stream_with_fault(cluster.url, lambda: cluster.procs[victim].send_signal(signal.SIGKILL))
    assert text == expected and finish == "length"
    state = cluster.wait(lambda s: node_state(s, victim) == "dead" and s["health"]["status"] == "ok",
                         timeout_s=30, what="w2 dead and serving")
    assert set(layered(state)) == {"w1", "w3"}
    assert sum(b - a for a, b in layered(state).values()) == 30
    events = httpx.get(f"{cluster.url}/v1/events").json()["events"]
    kinds = [e["kind"] for e in events]
    assert "dead" in kinds and "replan" in kinds and "engine_crash" in kinds
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert "anyway_recovery_seconds_count" in metrics


def test_killed_worker_restarts_and_is_planned_again(cluster: LocalCluster) -> None:
    cluster.restart("w2")  # the box boots again; nobody runs any command on the cluster
    state = cluster.wait(lambda s: set(layered(s)) == {"w1", "w2", "w3"} and s["health"]["status"] == "ok",
                         timeout_s=60, what="w2 back in the plan")
    assert node_state(state, "w2") == "alive"


def test_sigstop_worker_mid_stream(cluster: LocalCluster, expected: str) -> None:
    victim = "w3"
    procs = worker_tree(cluster, victim)
    assert len(procs) == 2, "agent + RPC server"

    def hang() -> None:
        for p in procs:
            p.send_signal(signal.SIGSTOP)

    try:
        text, finish = stream_with_fault(cluster.url, hang)
        assert text == expected and finish == "length"
        state = cluster.wait(lambda s: node_state(s, victim) == "dead" and s["health"]["status"] == "ok",
                             timeout_s=30, what="hung w3 dead and serving")
        assert set(layered(state)) == {"w1", "w2"}
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
    # The box wakes up: it is taken back without any command.
    cluster.wait(lambda s: set(layered(s)) == {"w1", "w2", "w3"} and s["health"]["status"] == "ok",
                 timeout_s=60, what="w3 back after SIGCONT")


def test_sigstop_rpc_server_only_mid_stream(cluster: LocalCluster, expected: str) -> None:
    """The agent keeps heartbeating but its RPC server hangs: the agent reports it, the
    head re-plans without that node, and takes it back when the server runs again."""
    victim = "w1"
    rpc = [p for p in worker_tree(cluster, victim) if "rpc_server" in " ".join(p.cmdline())]
    assert len(rpc) == 1
    try:
        text, _ = stream_with_fault(cluster.url, lambda: rpc[0].send_signal(signal.SIGSTOP))
        assert text == expected
        state = cluster.wait(lambda s: set(layered(s)) == {"w2", "w3"} and s["health"]["status"] == "ok",
                             timeout_s=40, what="plan without the hung RPC server")
        assert node_state(state, victim) == "alive"  # the box itself is fine
    finally:
        rpc[0].send_signal(signal.SIGCONT)
    cluster.wait(lambda s: set(layered(s)) == {"w1", "w2", "w3"}, timeout_s=60, what="w1 back after SIGCONT")


def test_sigkill_engine_mid_stream(cluster: LocalCluster, expected: str) -> None:
    before = httpx.get(f"{cluster.url}/v1/cluster").json()
    pid = engine_pid(cluster)
    text, finish = stream_with_fault(cluster.url, lambda: os.kill(pid, signal.SIGKILL))
    assert text == expected and finish == "length"
    state = cluster.wait(lambda s: s["health"]["status"] == "ok", timeout_s=30, what="engine back")
    assert state["engine"]["generation"] > before["engine"]["generation"]
    assert set(layered(state)) == {"w1", "w2", "w3"}  # no node was at fault: same plan


def test_drain_and_uncordon_without_failing_requests(cluster: LocalCluster, expected: str) -> None:
    anyway = [sys.executable, "-m", "appliance"]

    def drain() -> None:
        res = subprocess.run([*anyway, "drain", "w1", "--url", cluster.url], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr

    text, _ = stream_with_fault(cluster.url, drain)
    assert text == expected
    state = cluster.wait(lambda s: set(layered(s)) == {"w2", "w3"} and s["health"]["status"] == "ok",
                         timeout_s=30, what="w1 drained")
    assert node_state(state, "w1") == "cordoned"
    res = subprocess.run([*anyway, "status", "--url", cluster.url], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "cordoned" in res.stdout and "w1" in res.stdout
    res = subprocess.run([*anyway, "uncordon", "w1", "--url", cluster.url], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    cluster.wait(lambda s: set(layered(s)) == {"w1", "w2", "w3"}, timeout_s=30, what="w1 back after uncordon")
    res = subprocess.run([*anyway, "drain", "nobody", "--url", cluster.url], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "no node named" in res.stderr


def test_concurrent_streams_survive_a_worker_death(cluster: LocalCluster, reference, demo_model: Path) -> None:  # type: ignore[no-untyped-def]
    prompts = ["Tell me about the sea.", "Explain how bread is made.", "Describe a mountain."]
    want = {p: reference.chat(demo_model, [{"role": "user", "content": p}], 96)[0] for p in prompts}
    got: dict[str, str] = {}
    started = threading.Barrier(len(prompts) + 1)

    def ask(p: str) -> None:
        c = OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=180)
        s = c.chat.completions.create(model=served_model(cluster.url), messages=[{"role": "user", "content": p}],
                                      max_tokens=96, temperature=0, stream=True)
        parts = []
        for i, ch in enumerate(s):
            if i == 5:
                started.wait()
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
        got[p] = "".join(parts)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    started.wait()
    cluster.procs["w1"].send_signal(signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert got == want
    cluster.restart("w1")
    cluster.wait(lambda s: set(layered(s)) == {"w1", "w2", "w3"}, timeout_s=60, what="w1 back")
