"""Snapshot tests of the dashboard's screens (pytest-textual-snapshot), on deterministic data.

These use `FakeSource`, an in-memory `ClusterSource` with fixed data and fixed
timestamps, instead of a live head: a screenshot is only comparable run to run if
nothing in it depends on the clock, the machine or the model's sampling. The data is
written as the JSON bodies the head's API returns and parsed with the same models
(appliance.common.status) that `HttpSource` uses, so this fake stands in for the HTTP
layer only; the Pilot tests in tests/test_tui_live.py exercise the same screens
against a real `anyway up` cluster.

Regenerate the baselines after an intended UI change with
`pytest tests/test_tui_snapshots.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input

from appliance.common.kinds import NodeState
from appliance.common.status import ClusterStatus, EventsPage, NodeActionResult, ReloadResult
from tui.app import AnywayApp
from tui.screens.chat import ChatScreen
from tui.screens.node import NodeScreen
from tui.source import ClusterSource, HeadError, HeadUnreachable, Messages, parse_answer

NOW = 1_750_000_000.0  # the fixed "now" every age on screen is relative to
GiB = 1 << 30
MiB = 1 << 20


def _node(
    name: str,
    *,
    address: str,
    state: str = "alive",
    layers: list[int] | None,
    total: int,
    free: int,
    devices: list[dict[str, Any]],
    cpu: float,
    hb: float,
    joined_ago: float,
    reason: str = "",
) -> dict[str, Any]:
    history = [[NOW - 30 + i, free + ((i * 7919) % 13 - 6) * 16 * MiB + max(0, 20 - i) * 64 * MiB] for i in range(30)]
    n_layers = (layers[1] - layers[0]) if layers else 0
    return {
        "name": name,
        "address": address,
        "hostname": name,
        "rpc_endpoint": f"{address}:50052",
        "state": state,
        "liveness": "suspect" if state == "suspect" else "alive",
        "cordoned": state in ("cordoned", "draining"),
        "rpc_ready": state != "joining",
        "heartbeat_age_s": hb,
        "layers": layers,
        "n_layers": n_layers,
        "memory": {
            "total_bytes": total,
            "free_bytes": free,
            "plannable_bytes": free - 512 * MiB,
            "planned_bytes": n_layers * 96 * MiB,
        },
        "memory_history": history,
        "devices": devices,
        "versions": {"package": "0.1.0", "rpc_protocol": "7.0.0", "protocol": "1", "llama_cpp": "0.3.36"},
        "load": {"cpu_percent": cpu, "ram_percent": 41.0, "loadavg_1m": 1.25, "rpc_rss_bytes": 1536 * MiB,
                 **({"rpc_busy": round(cpu / 100 * 0.8, 3)} if n_layers else {})},
        "speed": 1.0,
        "joined_at": NOW - joined_ago,
        "reason": reason,
    }


def _cpu(total: int, free: int) -> dict[str, Any]:
    return {"index": 0, "name": "CPU", "description": "AMD Ryzen 7 5700G", "type": "cpu", "free_bytes": free, "total_bytes": total}


def fake_cluster(*, variant: str = "serving") -> dict[str, Any]:
    """A /v1/cluster body: 32 layers over three boxes (one with a GPU), a cordoned fourth."""
    gpu = {"index": 0, "name": "CUDA0", "description": "NVIDIA GeForce RTX 3060", "type": "gpu",
           "free_bytes": 9 * GiB, "total_bytes": 12 * GiB}
    nodes = [
        _node("attic-pc", address="192.168.1.20", layers=[0, 14], total=32 * GiB, free=21 * GiB,
              devices=[gpu, _cpu(32 * GiB, 21 * GiB)], cpu=63.0, hb=0.4, joined_ago=3 * 3600),
        _node("laptop", address="192.168.1.31", layers=[14, 24], total=16 * GiB, free=7 * GiB,
              devices=[_cpu(16 * GiB, 7 * GiB)], cpu=48.0, hb=0.7, joined_ago=2 * 3600),
        _node("nas", address="192.168.1.5", layers=[24, 32], total=8 * GiB, free=3 * GiB,
              devices=[_cpu(8 * GiB, 3 * GiB)], cpu=71.0, hb=1.3, joined_ago=50 * 60),
        _node("old-mac", address="192.168.1.44", state="cordoned", layers=None, total=8 * GiB, free=6 * GiB,
              devices=[_cpu(8 * GiB, 6 * GiB)], cpu=3.0, hb=0.5, joined_ago=40 * 60),
    ]
    assignments = [
        {"node": n["name"], "start": n["layers"][0], "end": n["layers"][1], "n_layers": n["n_layers"], "is_head": False}
        for n in nodes if n["layers"]
    ]
    engine: dict[str, Any] = {
        "state": "serving", "progress": 1.0, "generation": 4, "restarts": 3, "last_error": "",
        "requests_in_flight": 2,
        "speculation": {"mode": "prompt", "default": True, "draft_max": 8, "drafted": 1234, "accepted": 765,
                        "acceptance": 0.62},
    }
    health = {"status": "ok", "reason": ""}
    throughput = {"tokens_per_s": 18.4, "requests_in_flight": 2}
    if variant == "loading":
        nodes[2]["state"] = "suspect"
        nodes[2]["heartbeat_age_s"] = 2.6
        engine.update(state="loading", progress=0.42, generation=5, load=[
            {"node": "attic-pc", "bytes": 1650 * MiB, "total_bytes": 2000 * MiB, "bytes_per_s": 61 * MiB},
            {"node": "laptop", "bytes": 420 * MiB, "total_bytes": 1430 * MiB, "bytes_per_s": 58 * MiB},
        ])
        health = {"status": "recovering", "reason": "engine loading the model (42%)"}
        throughput = {"tokens_per_s": 0.0, "requests_in_flight": 1}
    return {
        "version": "0.1.0",
        "health": health,
        "model": {"id": "Llama-3.1-8B-Instruct.Q4_K_M", "n_layers": 32, "architecture": "llama",
                  "name": "Llama 3.1 8B Instruct", "total_weight_bytes": 4_600 * MiB, "context_length": 131072},
        "nodes": nodes,
        "plan": {"assignments": assignments, "n_layers": 32, "tensor_split": [14.0, 10.0, 9.0]},
        "engine": engine,
        "throughput": throughput,
        "events_last_id": len(FAKE_EVENTS),
        "uptime_s": 3 * 3600 + 120.0,
    }


FAKE_EVENTS: list[dict[str, Any]] = [
    {"kind": "head_start", "node": "", "message": "head 0.1.0 serving Llama-3.1-8B-Instruct.Q4_K_M (32 layers)", "ago": 3 * 3600 + 120},
    {"kind": "join", "node": "attic-pc", "message": "attic-pc joined from 192.168.1.20", "ago": 3 * 3600},
    {"kind": "join", "node": "laptop", "message": "laptop joined from 192.168.1.31", "ago": 2 * 3600},
    {"kind": "join", "node": "nas", "message": "nas joined from 192.168.1.5", "ago": 50 * 60},
    {"kind": "join", "node": "old-mac", "message": "old-mac joined from 192.168.1.44", "ago": 40 * 60},
    {"kind": "drain", "node": "old-mac", "message": "old-mac drained by the operator: its layers move to the other nodes", "ago": 20 * 60},
    {"kind": "suspect", "node": "laptop", "message": "laptop missed 4 heartbeats", "ago": 9 * 60},
    {"kind": "alive", "node": "laptop", "message": "laptop is alive and ready for layers", "ago": 9 * 60 - 2},
    {"kind": "engine_crash", "node": "", "message": "engine #3 exited unexpectedly (signal 9)", "ago": 6 * 60},
    {"kind": "replan", "node": "", "message": "plan over 3 worker(s): attic-pc:0-13, laptop:14-23, nas:24-31", "ago": 6 * 60 - 1},
    {"kind": "engine_start", "node": "", "message": "engine #4 starting (pid 4242): attic-pc[0-13], laptop[14-23], nas[24-31]", "ago": 6 * 60 - 1},
    {"kind": "engine_ready", "node": "", "message": "engine #4 serving (loaded in 7.9s)", "ago": 6 * 60 - 9},
]
for _i, _ev in enumerate(FAKE_EVENTS, start=1):
    _ev.update(id=_i, ts=NOW - _ev.pop("ago"))

ANSWER = ["Anyway", " splits", " one", " model", " across", " the", " machines", " you", " already", " own", "."]


class FakeSource(ClusterSource):
    """Deterministic in-memory stand-in for the head (fixed data and timestamps; see module docstring)."""

    label = "http://head.local:8080"

    def __init__(self, *, variant: str = "serving", tps: tuple[float, ...] = (0.0,)) -> None:
        self.variant = variant
        self.tps = tps
        self.calls = 0
        self.actions: list[tuple[str, str]] = []
        self.fail: Exception | None = None  # raised by every call while set
        self.action_error: Exception | None = None  # raised by drain/uncordon/reload while set

    async def cluster(self) -> ClusterStatus:
        if self.fail is not None:
            raise self.fail
        data = fake_cluster(variant=self.variant)
        data["throughput"]["tokens_per_s"] = self.tps[self.calls % len(self.tps)]
        self.calls += 1
        return ClusterStatus.model_validate(data)

    async def events(self, since: int = 0, *, node: str | None = None) -> EventsPage:
        if self.fail is not None:
            raise self.fail
        evs = [e for e in FAKE_EVENTS if (e["node"] == node if node else e["id"] > since)]
        return EventsPage.model_validate({"events": evs, "last_id": len(FAKE_EVENTS)})

    async def _act(self, what: str, node: str = "") -> None:
        self.actions.append((what, node))
        if self.action_error is not None:
            raise self.action_error

    async def drain(self, node: str, *, force: bool = False) -> NodeActionResult:
        await self._act("force-drain" if force else "drain", node)
        return NodeActionResult(node=node, state=NodeState.DRAINING)

    async def uncordon(self, node: str) -> NodeActionResult:
        await self._act("uncordon", node)
        return NodeActionResult(node=node, state=NodeState.ALIVE)

    async def reload(self) -> ReloadResult:
        await self._act("reload")
        return ReloadResult(status="reloading")

    async def chat_stream(self, messages: Messages) -> AsyncIterator[str]:
        for piece in ANSWER:
            await asyncio.sleep(0)
            yield piece


class StepTimer:
    """A monotonic clock that advances 50 ms per call: deterministic tokens/s."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 0.05
        return self.t


TPS = (4.0, 9.5, 14.0, 17.2, 12.1, 18.4, 21.0, 19.3, 16.8, 18.4)


def make_app(source: FakeSource | None = None) -> AnywayApp:
    # refresh_s is huge so that only the polls the test makes happen (the timer never fires).
    return AnywayApp(source=source or FakeSource(tps=TPS), refresh_s=3600, clock=lambda: NOW, timer=StepTimer())


async def _polled(pilot: Pilot[Any], *, polls: int = len(TPS) - 1) -> None:
    app = pilot.app
    assert isinstance(app, AnywayApp)
    await pilot.pause()
    for _ in range(polls):
        await app.poll_once()
    await pilot.pause()


def test_snapshot_cluster_80x24(snap_compare: Any) -> None:
    """The cluster screen at 80x24: engine, tokens/s sparkline, layer map, nodes, events."""
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=_polled)


def test_snapshot_cluster_120x34(snap_compare: Any) -> None:
    """The cluster screen on a larger terminal."""
    assert snap_compare(make_app(), terminal_size=(120, 34), run_before=_polled)


def test_snapshot_cluster_loading_and_unreachable(snap_compare: Any) -> None:
    """Engine loading (progress bar, recovering reason, a suspect node), then the head goes away."""
    source = FakeSource(variant="loading")

    async def run_before(pilot: Pilot[Any]) -> None:
        await _polled(pilot, polls=0)
        source.fail = HeadUnreachable("http://head.local:8080: connection refused")
        assert isinstance(pilot.app, AnywayApp)
        await pilot.app.poll_once()
        await pilot.pause()

    assert snap_compare(make_app(source), terminal_size=(100, 30), run_before=run_before)


def test_snapshot_node_detail(snap_compare: Any) -> None:
    """Node detail (enter on the first row): state, devices, versions, memory history, its events."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await _polled(pilot)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(pilot.app.screen, NodeScreen)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)


def test_snapshot_chat(snap_compare: Any) -> None:
    """The chat screen after one streamed answer, with its token count and tokens/s."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await _polled(pilot, polls=0)
        await pilot.press("c")
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, ChatScreen)
        screen.query_one(Input).cursor_blink = False
        await pilot.press(*"What is Anyway?")
        await pilot.press("enter")
        deadline = time.monotonic() + 30
        while (screen.streaming or len(screen.messages) < 2) and time.monotonic() < deadline:
            await pilot.pause(0.02)
        assert screen.answer == "".join(ANSWER)

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)


def test_snapshot_help(snap_compare: Any) -> None:
    """The help screen over the cluster screen."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await _polled(pilot, polls=0)
        await pilot.press("question_mark")

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)


def test_snapshot_confirm_drain(snap_compare: Any) -> None:
    """The confirmation dialog before a drain."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await _polled(pilot, polls=0)
        await pilot.press("down", "d")

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)


# ---------------------------------------------------------------- behaviour on the fake
def test_actions_confirm_and_errors_notify() -> None:
    """Actions need a "y"; "n" does nothing; an HTTP 409 from the head is a notification, not a crash."""

    async def main() -> None:
        source = FakeSource()
        app = make_app(source)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await _polled(pilot, polls=0)
            await pilot.press("d")
            await pilot.pause()
            await pilot.press("n")
            await pilot.pause()
            assert source.actions == []
            await pilot.press("down", "d")
            await pilot.pause()
            await pilot.press("y")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert source.actions == [("drain", "laptop")]
            source.action_error = HeadError(
                "HTTP 409: draining laptop would leave the model without room", status=409, code="would_degrade"
            )
            await pilot.press("D")
            await pilot.pause()
            await pilot.press("y")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert source.actions[-1] == ("force-drain", "laptop")
            errors = [n for n in app._notifications if n.severity == "error"]
            assert errors and "409" in errors[-1].message
            source.action_error = None
            await pilot.press("r")
            await pilot.pause()
            await pilot.press("y")
            await app.workers.wait_for_complete()
            assert source.actions[-1] == ("reload", "")
            assert app.is_running

    asyncio.run(main())


def test_odd_answers_do_not_crash() -> None:
    """Bodies that break the contract, a bare refused node, no plan, an HTTP error: the app keeps running.

    The bodies go through `parse_answer`, the same check `HttpSource` makes, so a body
    that does not validate reaches the app as an `UnexpectedAnswer` (a banner), never
    as a half-filled model.
    """
    bare = fake_cluster()
    bare.update(plan=None, nodes=[{"name": "r", "state": "refused", "layers": None}], events_last_id=0)
    garbage = fake_cluster()
    garbage["nodes"] = [{"name": "x", "state": "alive", "layers": "garbage", "memory": None, "heartbeat_age_s": "?"}]
    garbage["model"]["n_layers"] = "many"

    class OddSource(FakeSource):
        def __init__(self) -> None:
            super().__init__()
            self.bodies: list[Any] = [{}, bare, garbage, [], fake_cluster()]
            self.errors: list[str] = []

        async def cluster(self) -> ClusterStatus:
            if not self.bodies:
                raise HeadError("HTTP 401: Incorrect API key provided", status=401, code="invalid_api_key")
            return parse_answer(ClusterStatus, copy.deepcopy(self.bodies.pop(0)), what="/v1/cluster")

    async def main() -> None:
        app = make_app(OddSource())
        async with app.run_test(size=(80, 24)) as pilot:
            await app.workers.wait_for_complete()  # the poll on mount takes the first body
            await pilot.pause()
            seen = [(app.snapshot.reach, app.snapshot.error)]
            for _ in range(6):
                await app.poll_once()
                await pilot.pause()
                assert app.is_running
                seen.append((app.snapshot.reach, app.snapshot.error))
            reach = [r for r, _ in seen]
            assert reach == ["error", "ok", "error", "error", "ok", "error", "error"], seen
            assert seen[0][1].startswith("unexpected answer from the head: /v1/cluster: version: Field required")
            assert all(e.startswith("unexpected answer from the head: /v1/cluster: ") for e in (seen[2][1], seen[3][1]))
            assert all("\n" not in error for _, error in seen)
            assert "401" in app.snapshot.error
            await pilot.press("enter")
            await pilot.pause()
            assert app.is_running

    asyncio.run(main())
