"""Lanes: several llama.cpp contexts over one set of weights, so concurrent requests keep
every worker busy (appliance.engine.lanes), and the busy fraction the workers report.

The pure parts (how the batch is spread, what the plan reserves, the busy arithmetic,
hostile values) are tables; the rest runs a real cluster: a head whose engine has two
lanes and two real workers with their ggml RPC servers on loopback TCP. Every output is
compared with the same model in one plain llama-cpp-python process.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import served_model, wait_until
from test_membership import hello
from openai import OpenAI

from appliance.cli.up import LocalCluster
from appliance.common.config import Timing
from appliance.core.membership import Membership
from appliance.core.profile import ModelProfile
from appliance.core.planner import NodeCapacity, Plan, compute_reserve_bytes, make_plan, replan_without
from appliance.engine.lanes import lane_batches
from appliance.worker.rpc_child import BusyMeter, busy_fraction

LANES = 2


# ------------------------------------------------------------------ pure
@pytest.mark.parametrize(
    ("max_batch", "lanes", "want"),
    [
        pytest.param(4, 1, [4], id="one-lane-holds-the-batch"),
        pytest.param(4, 2, [2, 2], id="even"),
        pytest.param(5, 2, [3, 2], id="uneven-first-lanes-hold-more"),
        pytest.param(2, 4, [1, 1], id="never-more-lanes-than-sequences"),
        pytest.param(3, 0, [3], id="zero-means-one"),
    ],
)
def test_lane_batches(max_batch: int, lanes: int, want: list[int]) -> None:
    got = lane_batches(max_batch, lanes)
    assert got == want and sum(got) == max_batch


@pytest.mark.parametrize(
    ("cpu_s", "wall_s", "threads", "want"),
    [
        pytest.param(0.5, 1.0, 1, 0.5, id="half-of-one-thread"),
        pytest.param(1.0, 1.0, 2, 0.5, id="one-of-two-threads"),
        pytest.param(3.0, 1.0, 2, 1.0, id="capped-at-one"),
        pytest.param(0.0, 1.0, 1, 0.0, id="idle"),
        pytest.param(1.0, 0.0, 1, 0.0, id="no-interval"),
    ],
)
def test_busy_fraction(cpu_s: float, wall_s: float, threads: int, want: float) -> None:
    assert busy_fraction(cpu_s=cpu_s, wall_s=wall_s, threads=threads) == want


def test_busy_meter_needs_an_interval_of_one_server() -> None:
    m = BusyMeter()
    assert m.sample(cpu_s=10.0, now_s=100.0, threads=1) is None  # first sample: no interval yet
    assert m.sample(cpu_s=10.5, now_s=101.0, threads=1) == 0.5
    assert m.sample(cpu_s=0.2, now_s=102.0, threads=1) is None  # CPU time went back: a new server process
    assert m.sample(cpu_s=None, now_s=103.0, threads=1) is None  # no server
    assert m.sample(cpu_s=0.3, now_s=104.0, threads=1) is None
    assert m.sample(cpu_s=0.3, now_s=105.0, threads=1) == 0.0


def _profile(n_layers: int = 8) -> ModelProfile:
    return ModelProfile(
        path="m.gguf", file_bytes=n_layers * (100 << 20), architecture="llama", name="m", n_layers=n_layers,
        layer_bytes=(100 << 20,) * n_layers, input_bytes=50 << 20, output_bytes=50 << 20,
        kv_bytes_per_token_per_layer=4096, context_length=8192, embedding_length=2048, vocab_size=32000,
        has_chat_template=True,
    )


def test_each_lane_pays_for_its_compute_buffers() -> None:
    prof = _profile()
    one = compute_reserve_bytes(profile=prof, n_ctx=8192, output=True)
    two = compute_reserve_bytes(profile=prof, n_ctx=8192, output=True, lanes=2)
    assert one < two < 2 * one  # the fixed buffers twice, the score matrix over half the context each
    nodes = [NodeCapacity(name="w1", free_bytes=2 << 30, endpoint="a:1"),
             NodeCapacity(name="w2", free_bytes=2 << 30, endpoint="b:1")]
    p1 = make_plan(nodes=nodes, profile=prof, n_ctx=8192)
    p2 = make_plan(nodes=nodes, profile=prof, n_ctx=8192, lanes=2)
    assert p2.lanes == 2 and p1.lanes == 1
    assert [a.reserve_bytes for a in p2.assignments] > [a.reserve_bytes for a in p1.assignments]
    assert p1.key() != p2.key()  # a change of lanes is a reload
    assert Plan.from_dict(p2.to_dict()) == p2
    # A stable re-plan keeps the lanes it was made with, and is not made across a change of lanes.
    after = replan_without(p2, nodes=nodes[1:], profile=prof, n_ctx=8192, lanes=2)
    assert after is not None and after.lanes == 2
    assert replan_without(p2, nodes=nodes[1:], profile=prof, n_ctx=8192, lanes=1) is None


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param(0.42, 0.42, id="a-fraction"),
        pytest.param(7.0, 1.0, id="above-one-is-capped"),
        pytest.param(-0.5, None, id="negative-dropped"),
        pytest.param(float("nan"), None, id="nan-dropped"),
        pytest.param("busy", None, id="not-a-number-dropped"),
    ],
)
def test_reported_busy_is_a_fraction_whatever_a_peer_sends(sent: Any, kept: float | None) -> None:
    m = Membership(timing=Timing().heartbeat, rpc_protocol="7.0.0", package_version="0.1.0")
    m.hello(identity=b"a", body=hello(), peer_address="10.0.0.5", now=0.0)
    m.heartbeat(identity=b"a", body={"load": {"rpc_busy": sent}}, now=0.5)
    assert m.nodes["w1"].load.get("rpc_busy") == kept


# ------------------------------------------------------------ real cluster
@pytest.fixture(scope="module")
def cluster(make_module_cluster: Any, demo_model: Path) -> LocalCluster:
    c = make_module_cluster(demo_model, workers=2, head_args=["--lanes", str(LANES), "--max-batch", "4"])
    c.wait_serving(nodes=2)
    return c


pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_the_engine_runs_its_lanes_and_the_plan_reserves_them(cluster: LocalCluster) -> None:
    st = httpx.get(f"{cluster.url}/v1/cluster").json()
    assert st["engine"]["lanes"] == LANES and st["plan"]["lanes"] == LANES
    assert st["engine"]["max_batch"] == 4


@pytestmark_slow
def test_outputs_with_lanes_equal_outputs_alone(cluster: LocalCluster, reference, demo_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Concurrent greedy requests of different lengths, starting at different times (so
    requests join and leave lanes mid-step), each equal to the model alone in one process."""
    asks = [
        ("The sun rises in the", 40, 0.0),
        ("My favourite food is", 12, 0.0),
        ("In 1969, astronauts", 56, 0.3),
        ("Python is a language that", 24, 0.6),
        ("The capital of France is", 8, 0.9),
        ("Once upon a time, a fox", 32, 1.2),
    ]
    want = {p: reference.complete(demo_model, p, n)[0] for p, n, _ in asks}
    got: dict[str, str] = {}
    model_id = served_model(cluster.url)

    def ask(p: str, n: int, delay: float) -> None:
        time.sleep(delay)
        client = OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=180)
        r = client.completions.create(model=model_id, prompt=p, max_tokens=n, temperature=0)
        got[p] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=a) for a in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert got == want


@pytestmark_slow
def test_workers_report_their_busy_fraction(cluster: LocalCluster) -> None:
    """While the cluster decodes, the workers' RPC servers show compute time, in /v1/cluster
    and in /metrics; the fraction is measured from the server process's CPU time."""
    model_id = served_model(cluster.url)
    done = threading.Event()

    def generate() -> None:
        client = OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=180)
        while not done.is_set():
            client.completions.create(model=model_id, prompt="Count: one, two,", max_tokens=24, temperature=0)

    t = threading.Thread(target=generate)
    t.start()
    try:
        def busy() -> dict[str, float] | None:
            nodes = httpx.get(f"{cluster.url}/v1/cluster").json()["nodes"]
            b = {n["name"]: n["load"].get("rpc_busy") for n in nodes}
            return b if all(v is not None and v > 0.05 for v in b.values()) else None

        seen = wait_until(busy, timeout_s=30, what="both workers computing", interval_s=0.2)
        assert all(0 < v <= 1 for v in seen.values())
        metrics = httpx.get(f"{cluster.url}/metrics").text
        assert 'anyway_worker_busy_ratio{node="w1"}' in metrics
        assert 'anyway_worker_busy_ratio{node="w2"}' in metrics
    finally:
        done.set()
        t.join(timeout=120)


@pytestmark_slow
def test_a_worker_kill_during_pipelined_decoding_resumes_every_stream(
    cluster: LocalCluster, reference, demo_model: Path  # type: ignore[no-untyped-def]
) -> None:
    prompts = ["Tell me about the sea.", "Explain how bread is made.", "Describe a mountain.", "Why is the sky blue?"]
    want = {p: reference.chat(demo_model, [{"role": "user", "content": p}], 80)[0] for p in prompts}
    got: dict[str, str] = {}
    started = threading.Barrier(len(prompts) + 1)
    model_id = served_model(cluster.url)

    def ask(p: str) -> None:
        c = OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=180)
        s = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}],
                                      max_tokens=80, temperature=0, stream=True)
        parts = []
        for i, ch in enumerate(s):
            if i == 5:
                started.wait(timeout=120)
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
        got[p] = "".join(parts)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    cluster.procs["w1"].send_signal(signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert got == want
    st = httpx.get(f"{cluster.url}/v1/cluster").json()
    assert st["engine"]["lanes"] == LANES  # the new engine has its lanes too
    cluster.restart("w1")
    cluster.wait(lambda s: {n["name"] for n in s["nodes"] if n.get("layers")} == {"w1", "w2"},
                 timeout_s=90, what="w1 back in the plan")
