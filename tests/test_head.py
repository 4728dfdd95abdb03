"""The head as a process: its loops are supervised, its counters tell the truth, and a box that
comes back does not interrupt the answers the others are carrying.

The supervision unit tests drive `TaskSupervisor` with plain coroutines; everything else runs
on real local clusters (real processes, real ZeroMQ with CurveZMQ, real HTTP).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from appliance.common import protocol as P
from appliance.common.config import RecoveryTiming
from appliance.head.tasks import TaskFailed, TaskSpec, TaskSupervisor
from helpers import node_dealer

FAST = RecoveryTiming(TASK_RESTARTS_PER_WINDOW=3, TASK_RESTART_WINDOW_S=60, TASK_BACKOFF_MIN_S=0.01, TASK_BACKOFF_MAX_S=0.02)


# ------------------------------------------------------------- supervision
def test_a_task_that_dies_is_restarted() -> None:
    runs: list[int] = []
    restarted: list[str] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("one bad frame")
        await asyncio.sleep(3600)

    async def main() -> None:
        stop = asyncio.Event()
        sup = TaskSupervisor(timing=FAST, on_restart=restarted.append)
        runner = asyncio.create_task(sup.run([TaskSpec("flaky", flaky)], stop=stop))
        for _ in range(100):
            if len(runs) == 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(runner, 5)

    asyncio.run(main())
    assert len(runs) == 2 and restarted == ["flaky"]


@pytest.mark.parametrize(
    "body, restart",
    [
        pytest.param("raises", True, id="keeps-dying"),
        pytest.param("returns", True, id="keeps-returning"),
        pytest.param("returns", False, id="must-not-end"),
    ],
)
def test_a_task_that_cannot_be_kept_alive_ends_the_head(body: str, restart: bool) -> None:
    other_cancelled = asyncio.Event()

    async def bad() -> None:
        await asyncio.sleep(0)
        if body == "raises":
            raise ValueError("broken")

    async def other() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            other_cancelled.set()
            raise

    async def main() -> None:
        sup = TaskSupervisor(timing=FAST)
        with pytest.raises(TaskFailed, match="bad"):
            await asyncio.wait_for(
                sup.run([TaskSpec("bad", bad, restart=restart), TaskSpec("other", other)], stop=asyncio.Event()), 5
            )
        assert other_cancelled.is_set()  # nothing is left half alive

    asyncio.run(main())


# ------------------------------------------------------------- probe triggers
def test_a_storm_of_dropped_connections_cannot_make_the_head_probe_without_end() -> None:
    """Every dropped control connection (any peer can make one, key or not) triggers RPC probe
    rounds; a storm of them shares rounds instead of piling up thousands."""
    from appliance.common.config import HeartbeatTiming
    from appliance.core.membership import Membership
    from appliance.head.probe import RpcProber

    t = RecoveryTiming()
    prober = RpcProber(membership=Membership(timing=HeartbeatTiming(), rpc_protocol="7", package_version="0"),
                       heartbeat=HeartbeatTiming(), recovery=t, on_events=lambda _: None, plans=lambda: ())
    prober.schedule(100.0)
    assert prober.rounds == [100.0 + d for d in t.RPC_PROBE_AFTER_S]  # one real trigger: the full series
    for i in range(10_000):  # 10 s of a trigger every millisecond
        prober.schedule(100.0 + i / 1000)
    horizon = max(t.RPC_PROBE_AFTER_S)
    assert len(prober.rounds) <= (10 + horizon) / t.RPC_PROBE_TRIGGER_GAP_S + len(t.RPC_PROBE_AFTER_S)
    # Bounded by what is still ahead, as the loop drops the rounds it has run:
    ahead = [r for r in prober.rounds if r > 110.0]
    assert len(ahead) <= horizon / t.RPC_PROBE_TRIGGER_GAP_S + 1
    # A real death after the storm is still probed at once.
    prober.schedule(120.0)
    assert 120.0 in prober.rounds


# ------------------------------------------------------------- real heads
def chat_ok(url: str) -> None:
    c = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}],
                                  max_tokens=4, temperature=0)
    assert r.choices[0].message.content


@pytest.mark.slow
def test_a_frame_that_broke_the_receive_loop_leaves_the_head_whole(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Deeply nested JSON from a peer holding a valid key used to raise RecursionError inside the
    control receive loop, which died: the head then answered `recovering` forever. Now the frame
    is dropped (and counted), and the head keeps hearing its workers."""
    c = make_cluster(tiny_model, workers=1)
    c.wait_serving(nodes=1)
    s = node_dealer(c, "w1")  # a node holding a valid key (a stolen box)
    try:
        s.send_multipart([P.PROTOCOL, P.HEARTBEAT, b"[" * 50_000 + b"]" * 50_000])
    finally:
        s.close()
    deadline = time.monotonic() + 20
    kinds: list[str] = []
    while time.monotonic() < deadline and "bad_frame" not in kinds:
        kinds = [e["kind"] for e in httpx.get(f"{c.url}/v1/events").json()["events"]]
        time.sleep(0.2)
    assert "bad_frame" in kinds
    time.sleep(2.5)  # longer than the worker's dead-after time: its heartbeats must still be read
    state = c.wait(lambda st: st["health"]["status"] == "ok", timeout_s=10, what="still serving")
    assert [n["state"] for n in state["nodes"]] == ["alive"]
    assert c.procs["head"].poll() is None
    chat_ok(c.url)


@pytest.mark.slow
def test_restarts_count_engine_losses_not_planned_replans(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(tiny_model, workers=2)
    c.wait_serving(nodes=2)
    assert httpx.post(f"{c.url}/v1/nodes/w2/drain", timeout=10).status_code == 202
    state = c.wait(lambda s: s["health"]["status"] == "ok" and s["engine"]["generation"] >= 2
                   and {n["name"] for n in s["nodes"] if n["layers"]} == {"w1"}, timeout_s=60, what="drained")
    assert state["engine"]["restarts"] == 0  # a drain is a planned re-plan, not a restart
    import psutil

    engine_pid = state["engine"]["pid"]
    psutil.Process(engine_pid).send_signal(signal.SIGKILL)
    state = c.wait(lambda s: s["health"]["status"] == "ok" and s["engine"]["pid"] not in (None, engine_pid),
                   timeout_s=60, what="engine restarted")
    assert state["engine"]["restarts"] == 1
    assert "anyway_engine_crashes_total 1.0" in httpx.get(f"{c.url}/metrics").text


PROMPT = "Once upon a time, in a land far away,"
N_TOKENS = 1500  # long enough (~10 s here) for the killed worker to be back mid-stream


@pytest.mark.slow
def test_a_worker_back_within_a_second_costs_one_reload_not_two(make_cluster, demo_model: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """A worker killed and started again at once: the head re-plans without it (one reload)
    and resumes the stream; the worker's return must not interrupt the streams again — it
    joins the plan once no request is in flight."""
    expected, n = reference.complete(demo_model, PROMPT, N_TOKENS)
    assert n == N_TOKENS
    c = make_cluster(demo_model, workers=3)
    c.wait_serving(nodes=3)
    gen0 = c.cluster_state()["engine"]["generation"]
    client = OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=300)
    model = client.models.list().data[0].id

    test_over = threading.Event()

    def kill_and_restart() -> None:
        c.procs["w2"].send_signal(signal.SIGKILL)
        c.procs["w2"].wait(timeout=10)
        c.restart("w2")
        test_over.wait(120)  # the child dies with the thread that started it (PR_SET_PDEATHSIG)

    parts = []
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stream=True)
    for i, chunk in enumerate(stream):
        parts.append(chunk.choices[0].text if chunk.choices else "")
        if i == 20:
            threading.Thread(target=kill_and_restart, daemon=True).start()
    after_stream = c.cluster_state()
    if "".join(parts) != expected or after_stream["engine"]["generation"] != gen0 + 1:
        test_over.set()
    assert "".join(parts) == expected
    # One reload during the stream (the re-plan without w2), none for w2's return.
    assert after_stream["engine"]["generation"] == gen0 + 1, json.dumps(after_stream["engine"])
    w2 = next(n for n in after_stream["nodes"] if n["name"] == "w2")
    assert w2["state"] == "alive" and not w2["layers"]  # it was back, and waited
    # With no request in flight, w2 is taken back.
    try:
        c.wait(lambda s: s["health"]["status"] == "ok" and {n["name"] for n in s["nodes"] if n["layers"]} == {"w1", "w2", "w3"},
               timeout_s=60, what="w2 back in the plan")
    finally:
        test_over.set()


@pytest.mark.slow
def test_reload_keeps_the_layout_unless_asked_to_replan(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """A reload restarts the engine on the same layout (the workers' caches hold its tensors);
    `?replan=true` plans afresh from the nodes' free memory now."""
    c = make_cluster(tiny_model, workers=2)
    s = c.wait_serving(nodes=2)
    layout = [(a["node"], a["start"], a["end"]) for a in s["plan"]["assignments"]]
    gen = s["engine"]["generation"]
    assert httpx.post(f"{c.url}/v1/reload", timeout=10).json() == {"status": "reloading"}
    s = c.wait(lambda x: x["engine"]["generation"] > gen and x["health"]["status"] == "ok", timeout_s=60, what="reloaded")
    assert [(a["node"], a["start"], a["end"]) for a in s["plan"]["assignments"]] == layout
    kinds = [e["message"] for e in httpx.get(f"{c.url}/v1/events").json()["events"] if e["kind"] == "reload"]
    assert kinds and "same layout" in kinds[-1]
    gen = s["engine"]["generation"]
    httpx.post(f"{c.url}/v1/reload", params={"replan": "true"}, timeout=10)
    c.wait(lambda x: x["engine"]["generation"] > gen and x["health"]["status"] == "ok", timeout_s=60, what="re-planned")
    kinds = [e["message"] for e in httpx.get(f"{c.url}/v1/events").json()["events"] if e["kind"] == "reload"]
    assert "fresh plan" in kinds[-1]
