"""The dashboard application: polls the head, holds the snapshot, runs the operator's actions.

`AnywayApp` is the only place that talks to a `ClusterSource`. It polls
`/v1/cluster` (and new `/v1/events`) in a Textual worker on a timer, so the UI never
blocks; publishes the result (the API's typed models) as one reactive `Snapshot` that
the screens watch; and turns every failure into a banner ("head unreachable —
retrying") or a notification, never an exception. `run_dashboard()` is what
`anyway tui` and `anyway up` call.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from textual import log
from textual.app import App
from textual.binding import Binding, BindingType
from textual.reactive import var
from textual.screen import Screen

from .screens.chat import ChatScreen
from .screens.cluster import ClusterScreen
from .screens.confirm import ConfirmScreen
from .screens.help import HelpScreen
from .source import ClusterSource, HeadUnreachable, HttpSource, SourceError
from .state import Reachability, Snapshot

__all__ = ["AnywayApp", "run_dashboard"]

MAX_EVENTS = 200

R = TypeVar("R")


class AnywayApp(App[int]):
    """Anyway's terminal dashboard: cluster, node detail and chat screens over one source."""

    CSS_PATH = "app.tcss"
    TITLE = "Anyway"
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {"cluster": ClusterScreen, "chat": ChatScreen}
    DEFAULT_MODE = "cluster"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f1", "help", "Help", show=False),
    ]

    #: The latest state of the cluster; screens watch it.
    snapshot: var[Snapshot] = var(Snapshot(), always_update=True)

    def __init__(
        self,
        *,
        source: ClusterSource,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
        history: int = 120,
    ) -> None:
        """`clock` (wall time, for ages) and `timer` (for rates) are injectable for tests."""
        super().__init__()
        self.source = source
        self.refresh_s = refresh_s
        self.clock = clock
        self.timer = timer
        self.history = history
        self._polling = False
        self._events_seen = 0
        self._uptime = 0.0
        self._skew = 0.0  #: the head's wall clock minus `clock`, from its last answer

    # ------------------------------------------------------------ lifecycle
    def on_mount(self) -> None:
        self.sub_title = self.source.label
        self.set_interval(self.refresh_s, self.refresh_now, name="poll")
        self.refresh_now()

    async def on_unmount(self) -> None:
        await self.source.aclose()

    # ------------------------------------------------------------ polling
    def refresh_now(self) -> None:
        """Start a poll in a worker unless one is still running (a slow head never piles them up)."""
        if self._polling:
            return
        self._polling = True
        self.run_worker(self.poll_once(), group="poll", exit_on_error=False)

    async def poll_once(self) -> None:
        """One poll of the head: cluster state, then any new events. Never raises."""
        self._polling = True
        try:
            await self._poll()
        except SourceError as exc:
            reach: Reachability = "unreachable" if isinstance(exc, HeadUnreachable) else "error"
            self._publish(reach=reach, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in a poll must not take the dashboard down
            log.error(f"poll failed: {exc!r}")
            self._publish(reach="error", error=f"poll failed: {exc!r}")
        finally:
            self._polling = False

    async def _poll(self) -> None:
        status = await self.source.cluster()
        old = self.snapshot
        events = old.events
        last_id = status.events_last_id
        if last_id < self._events_seen or status.uptime_s + 1.0 < self._uptime:
            # A new head process: its event ids start over.
            self._events_seen, events = 0, ()
        self._uptime = status.uptime_s
        if last_id > self._events_seen:
            page = await self.source.events(self._events_seen)
            new = [e for e in page.events if e.id > self._events_seen]
            events = (tuple(reversed(new)) + events)[:MAX_EVENTS]
            self._events_seen = max([last_id, *(e.id for e in new)])
        local = self.clock()
        # Ages of events and joins are relative to the head's clock (`now`), which
        # need not agree with this machine's; a head that does not send it: ours.
        self._skew = status.now - local if status.now > 0 else 0.0
        self.snapshot = Snapshot(
            cluster=status,
            events=events,
            reach="ok",
            error="",
            now=local + self._skew,
            throughput=(old.throughput + (status.throughput.tokens_per_s,))[-self.history :],
        )
        self.sub_title = self.source.label

    def _publish(self, *, reach: Reachability, error: str) -> None:
        old = self.snapshot
        self.snapshot = Snapshot(
            cluster=old.cluster,
            events=old.events,
            reach=reach,
            error=error,
            now=self.clock() + self._skew,
            throughput=old.throughput,
        )
        self.sub_title = f"{self.source.label} — head unreachable" if reach == "unreachable" else self.source.label

    # ------------------------------------------------------------ actions
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_chat(self) -> None:
        self.switch_mode("chat")

    def action_cluster(self) -> None:
        self.switch_mode("cluster")

    def confirm_drain(self, node: str, *, force: bool = False) -> None:
        verb = "Force-drain" if force else "Drain"
        extra = " even if the model no longer fits" if force else ""
        self._confirm(
            question=f"{verb} {node}{extra}?\nIts layers move to the other nodes.",
            action=lambda: self.source.drain(node, force=force),
            done=lambda r: f"{r.node}: {r.state.value}",
        )

    def confirm_uncordon(self, node: str) -> None:
        self._confirm(
            question=f"Uncordon {node}?\nIt can hold layers again at the next re-plan.",
            action=lambda: self.source.uncordon(node),
            done=lambda r: f"{r.node}: {r.state.value}",
        )

    def confirm_reload(self) -> None:
        self._confirm(
            question="Reload the model?\nThe engine restarts; requests in flight wait for it.",
            action=self.source.reload,
            done=lambda r: f"model: {r.status}",
        )

    def _confirm(
        self,
        *,
        question: str,
        action: Callable[[], Awaitable[R]],
        done: Callable[[R], str],
    ) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._act(action=action, done=done), group="action", exit_on_error=False)

        self.push_screen(ConfirmScreen(question=question), answered)

    async def _act(self, *, action: Callable[[], Awaitable[R]], done: Callable[[R], str]) -> None:
        try:
            result = await action()
        except SourceError as exc:
            self.notify(str(exc), title="the head refused", severity="error", markup=False)
            return
        except Exception as exc:  # noqa: BLE001 - never crash on an action
            self.notify(repr(exc), title="action failed", severity="error", markup=False)
            return
        self.notify(done(result), markup=False)
        self.refresh_now()


def run_dashboard(*, url: str, api_key: str | None, admin_key: str | None = None) -> int:
    """Run the dashboard against the head at `url` until the operator quits; the exit code.
    `admin_key` (if any) goes with drain, uncordon and reload only."""
    app = AnywayApp(source=HttpSource(url=url, api_key=api_key, admin_key=admin_key))
    code = app.run()
    return int(code or 0)
