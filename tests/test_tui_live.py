"""Pilot tests of the dashboard against real clusters (no fakes): the app talks HTTP to a live head.

- A real `anyway up --no-tui` (head + 2 workers on loopback, the 8-layer test model):
  the nodes table lists the workers with their layers; the chat screen shows an answer
  streamed from the cluster; draining a worker from the UI (key, confirmation) moves
  its layers to the other worker, and a drain the head refuses (409) is a notification.
- A cluster whose head is not there yet, then killed and restarted: the app shows
  "head unreachable" and recovers by itself each time the head comes back.

Waits poll the app (or the API) with generous deadlines; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from textual.pilot import Pilot

from appliance.cli.up import free_port
from appliance.common.kinds import EventKind, NodeState
from appliance.common.status import ClusterStatus
from tui.app import AnywayApp
from tui.screens.chat import ChatScreen
from tui.screens.cluster import ClusterScreen
from tui.screens.confirm import ConfirmScreen
from tui.source import HttpSource
from tui.widgets.banner import HeadBanner
from tui.widgets.layer_map import LayerMap
from tui.widgets.nodes_table import COLUMNS, NodesTable

pytestmark = pytest.mark.slow

TINY_LAYERS = 8  # tests/conftest.py's tiny_model


# ---------------------------------------------------------------- helpers
async def until(pilot: Pilot[Any], predicate: Callable[[], bool], *, what: str, timeout_s: float = 60.0) -> None:
    """Let the app run until `predicate()` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def table_rows(app: AnywayApp) -> dict[str, dict[str, str]]:
    """The cluster screen's nodes table as {node: {column: text}}."""
    table = _cluster_screen(app).query_one(NodesTable)
    keys = [key for key, _ in COLUMNS]
    return {name: dict(zip(keys, (str(c) for c in table.get_row(name)), strict=True)) for name in table.node_names}


def api(url: str) -> ClusterStatus:
    return ClusterStatus.model_validate(httpx.get(f"{url}/v1/cluster", timeout=5).json())


def layers_by_node(state: ClusterStatus) -> dict[str, tuple[int, int] | None]:
    return {n.name: n.layers for n in state.nodes}


def _cluster_screen(app: AnywayApp) -> ClusterScreen:
    for screen in app.screen_stack:
        if isinstance(screen, ClusterScreen):
            return screen
    raise AssertionError("the cluster screen is not in the stack")


def make_app(url: str) -> AnywayApp:
    return AnywayApp(source=HttpSource(url=url, max_tokens=24), refresh_s=0.3)


# ---------------------------------------------------------------- a real `anyway up --no-tui`
@pytest.fixture(scope="module")
def anyway_up(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`anyway up --no-tui` with 2 workers as a subprocess; its URL once /health says ok."""
    port = free_port()
    state = tmp_path_factory.mktemp("tui-up")
    log_path = state / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "up", "--no-tui", "--port", str(port), "--workers", "2",
             "--model", str(tiny_model), "--heartbeat-interval", "0.2", "--state-dir", str(state)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"anyway up exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"anyway up did not serve in 180s:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `anyway up` stops its head and workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_nodes_table_lists_workers_with_layers(anyway_up: str) -> None:
    """The nodes table shows both workers, alive, each holding a share of the 8 layers."""

    async def main() -> None:
        app = make_app(anyway_up)
        async with app.run_test(size=(100, 30)) as pilot:

            def both_hold_layers() -> bool:
                rows = table_rows(app)
                return sorted(rows) == ["worker-1", "worker-2"] and all(r["layers"] != "—" for r in rows.values())

            await until(pilot, both_hold_layers, what="both workers listed with layers")
            rows = table_rows(app)
            truth = layers_by_node(api(anyway_up))
            for name, row in rows.items():
                start, end = truth[name] or (0, 0)
                assert row["layers"].startswith(f"{start}-{end - 1}"), (name, row, truth)
                assert f"({end - start})" in row["layers"]
                assert row["address"] == "127.0.0.1"
            assert sum(e - s for s, e in (v for v in truth.values() if v)) == TINY_LAYERS
            layer_map = _cluster_screen(app).query_one(LayerMap)
            owners = {layer_map.owner_of(i) for i in range(TINY_LAYERS)}
            assert owners == {"worker-1", "worker-2"}
            kinds = {e.kind for e in app.snapshot.events}
            assert {EventKind.JOIN, EventKind.REPLAN, EventKind.ENGINE_READY} <= kinds
            assert app.snapshot.cluster is not None and app.snapshot.cluster.model.n_layers == TINY_LAYERS
            assert not _cluster_screen(app).query_one(HeadBanner).display

    asyncio.run(main())


def test_chat_streams_an_answer(anyway_up: str) -> None:
    """The chat screen sends a message to the cluster's endpoint and shows the streamed answer."""

    async def main() -> None:
        app = make_app(anyway_up)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.snapshot.reach == "ok", what="the first poll")
            await pilot.press("c")
            await pilot.pause()
            chat = app.screen
            assert isinstance(chat, ChatScreen)
            await pilot.press(*"Say hello.")
            await pilot.press("enter")
            await until(
                pilot,
                lambda: not chat.streaming and (len(chat.messages) == 2 or chat.stats.startswith("failed")),
                what="the streamed answer",
                timeout_s=120,
            )
            assert not chat.stats.startswith("failed"), chat.stats
            assert chat.answer.strip(), "empty answer"
            assert chat.n_deltas > 1, chat.stats  # it arrived as a stream of deltas, not one block
            assert f"{chat.n_deltas} tokens" in chat.stats and "tok/s" in chat.stats
            assert [m["role"] for m in chat.messages] == ["user", "assistant"]
            await pilot.press("ctrl+l")
            await pilot.pause()
            assert chat.messages == [] and chat.answer == ""

    asyncio.run(main())


def test_drain_from_the_ui_moves_layers(anyway_up: str) -> None:
    """d + y on worker-1 moves its layers to worker-2; draining the last worker is refused (409)."""

    async def main() -> None:
        app = make_app(anyway_up)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await until(pilot, lambda: len(table_rows(app)) == 2, what="the nodes table")
            table = _cluster_screen(app).query_one(NodesTable)
            for _ in range(table.node_names.index("worker-1")):
                await pilot.press("down")
            assert table.selected_node == "worker-1"
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
            await pilot.press("y")

            def moved() -> bool:
                rows = table_rows(app)
                return rows["worker-1"]["layers"] == "—" and rows["worker-2"]["layers"] == f"0-{TINY_LAYERS - 1} ({TINY_LAYERS})"

            await until(pilot, moved, what="worker-1's layers to move to worker-2", timeout_s=90)
            truth = layers_by_node(api(anyway_up))
            assert truth["worker-1"] is None and truth["worker-2"] == (0, TINY_LAYERS)
            assert table_rows(app)["worker-1"]["state"] in (NodeState.CORDONED.value, NodeState.DRAINING.value)
            worker_1 = app.snapshot.node("worker-1")
            assert worker_1 is not None and worker_1.cordoned
            layer_map = _cluster_screen(app).query_one(LayerMap)
            assert {layer_map.owner_of(i) for i in range(TINY_LAYERS)} == {"worker-2"}

            # The head refuses to drain the last worker: an error notification, no crash.
            await pilot.press("down" if table.node_names.index("worker-2") > table.cursor_row else "up")
            assert table.selected_node == "worker-2"
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
            await pilot.press("y")
            await until(
                pilot,
                lambda: any(n.severity == "error" and "409" in n.message for n in app._notifications),
                what="the 409 notification",
            )
            assert app.is_running
            assert layers_by_node(api(anyway_up))["worker-2"] == (0, TINY_LAYERS)

            # Uncordon worker-1 again from the UI (leaves the cluster as the module found it).
            await pilot.press("up" if table.node_names.index("worker-1") < table.cursor_row else "down")
            assert table.selected_node == "worker-1"
            await pilot.press("u")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: table_rows(app)["worker-1"]["state"] == "alive", what="worker-1 uncordoned")

    asyncio.run(main())


# ---------------------------------------------------------------- the head goes away and comes back
def test_head_unreachable_then_recovers(make_cluster: Any, tiny_model: Path) -> None:
    """No head yet: "head unreachable"; it starts: the app recovers; killed and restarted: again."""
    cluster = make_cluster(tiny_model, workers=1, start=False)

    async def main() -> None:
        app = make_app(cluster.url)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = _cluster_screen(app)
            banner = screen.query_one(HeadBanner)

            def unreachable() -> bool:
                return app.snapshot.reach == "unreachable" and banner.display and "head unreachable" in banner.message

            await until(pilot, unreachable, what="the unreachable banner", timeout_s=20)
            assert "head unreachable" in app.sub_title

            cluster.start_head()
            cluster.start_worker("w1")
            await until(
                pilot,
                lambda: app.snapshot.reach == "ok" and "w1" in table_rows(app) and not banner.display,
                what="the app to recover when the head starts",
            )
            assert "unreachable" not in app.sub_title

            head = cluster.procs["head"]
            head.send_signal(signal.SIGTERM)
            await asyncio.get_running_loop().run_in_executor(None, head.wait, 20)
            await until(pilot, unreachable, what="the banner after the head stopped", timeout_s=20)
            assert "w1" in table_rows(app), "the last known state stays on screen"

            cluster.restart("head")
            await until(
                pilot,
                lambda: app.snapshot.reach == "ok" and not banner.display,
                what="the app to recover when the head is back",
            )
            await until(pilot, lambda: "w1" in table_rows(app), what="w1 to rejoin the new head")
            assert app.is_running

    asyncio.run(main())
