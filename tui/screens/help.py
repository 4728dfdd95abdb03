"""The help screen: every key binding, and what the colours of states mean.

Shown over the current screen with "?" (or F1); any of escape, q or ? closes it.
"""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ..format import ENGINE_STATE_STYLE, HEALTH_STYLE, NODE_STATE_STYLE, styled

KEYS: tuple[tuple[str, str, str], ...] = (
    ("cluster", "↑ ↓", "select a node"),
    ("cluster", "enter", "node detail"),
    ("cluster", "d", "drain the node (its layers move to the others)"),
    ("cluster", "D", "force-drain, even if the model no longer fits"),
    ("cluster", "u", "uncordon the node (it may hold layers again)"),
    ("cluster", "r", "reload the model"),
    ("cluster", "c", "chat with the model"),
    ("node", "d / u", "drain / uncordon this node"),
    ("node", "escape", "back to the cluster"),
    ("chat", "enter", "send the message"),
    ("chat", "ctrl+l", "clear the conversation"),
    ("chat", "escape", "back to the cluster"),
    ("any", "? / f1", "this help"),
    ("any", "q / ctrl+q", "quit (q: not while typing)"),
)


def help_text() -> Table:
    keys = Table(box=None, show_header=False, padding=(0, 1, 0, 0), pad_edge=False)
    keys.add_column(style="dim", no_wrap=True)
    keys.add_column(style="bold cyan", no_wrap=True)
    keys.add_column()
    for screen, key, what in KEYS:
        keys.add_row(screen, key, what)
    legend = Table(box=None, show_header=False, padding=(0, 1, 0, 0), pad_edge=False)
    legend.add_column(style="dim", no_wrap=True)
    legend.add_column()
    legend.add_row("health", Text(" ").join(styled(s, HEALTH_STYLE) for s in HEALTH_STYLE))
    legend.add_row("engine", Text(" ").join(styled(s, ENGINE_STATE_STYLE) for s in ENGINE_STATE_STYLE))
    legend.add_row("nodes", Text(" ").join(styled(s, NODE_STATE_STYLE) for s in NODE_STATE_STYLE))
    outer = Table.grid(padding=(1, 0))
    outer.add_column()
    outer.add_row(keys)
    outer.add_row(legend)
    outer.add_row(Text("Every action asks for confirmation; errors from the head show as notifications.", style="dim"))
    return outer


class HelpScreen(ModalScreen[None]):
    """Key bindings and the colour legend."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
        Binding("question_mark", "close", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog"):
            yield Static(help_text(), id="help-text")

    def on_mount(self) -> None:
        dialog = self.query_one("#help-dialog")
        dialog.border_title = "Anyway dashboard — help"
        dialog.border_subtitle = "escape to close"

    def action_close(self) -> None:
        self.dismiss(None)
