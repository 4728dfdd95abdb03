"""The base of the screens that render the app's snapshot (cluster, node detail).

It subscribes the screen to the app's reactive `snapshot` and shields the app from
surprises: the source has already checked the head's answer against the typed
contract (a body that does not match never reaches a screen), but if a screen still
cannot render one, the operator gets one notification and the dashboard keeps running
and polling, instead of a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual import log
from textual.screen import Screen

from ..state import Snapshot

if TYPE_CHECKING:
    from ..app import AnywayApp


class SnapshotScreen(Screen[None]):
    """Call `follow_snapshot()` in `on_mount`; implement `show_snapshot()`."""

    _render_error = ""

    @property
    def anyway(self) -> AnywayApp:
        return cast("AnywayApp", self.app)

    def follow_snapshot(self) -> None:
        self.watch(self.app, "snapshot", self._show_safely, init=True)

    def show_snapshot(self, snapshot: Snapshot) -> None:
        raise NotImplementedError

    def _show_safely(self, snapshot: Snapshot) -> None:
        try:
            self.show_snapshot(snapshot)
        except Exception as exc:  # noqa: BLE001 - a rendering bug must not take the dashboard down
            message = f"cannot show the head's answer: {exc!r}"
            log.error(message)
            if message != self._render_error:
                self._render_error = message
                self.notify(message, title="display error", severity="error", markup=False)
        else:
            self._render_error = ""
