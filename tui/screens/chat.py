"""The chat screen: talk to the model the cluster serves, answers streamed token by token.

It uses the same OpenAI-compatible endpoint as any client (through the app's source),
shows the answer as it streams with its rate in tokens/s (one streamed chunk per
token, as the head sends them), and keeps the conversation until it is cleared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from ..source import SourceError

if TYPE_CHECKING:
    from ..app import AnywayApp


class ChatMessage(Static):
    """One turn of the conversation: who spoke, then the text."""

    LABELS: ClassVar[dict[str, tuple[str, str]]] = {"user": ("you", "bold"), "assistant": ("assistant", "bold green")}

    def __init__(self, *, role: str, text: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text

    def on_mount(self) -> None:
        self.set_text(self.text)

    def set_text(self, text: str) -> None:
        self.text = text
        label, style = self.LABELS.get(self.role, (self.role, "bold"))
        self.update(Text.assemble((label, style), "\n", text or ("…" if self.role == "assistant" else "")))


class ChatScreen(Screen[None]):
    """Conversation log, a stats line (tokens, tokens/s) and the input box."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.cluster", "Cluster"),
        Binding("ctrl+l", "clear", "Clear chat"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, str]] = []
        self.streaming = False
        self.n_deltas = 0  #: text deltas received for the last answer
        self.stats = ""  #: the stats line, as plain text

    @property
    def anyway(self) -> AnywayApp:
        return cast("AnywayApp", self.app)

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="chat-log")
        yield Static(Text("type a message and press enter", style="dim"), id="chat-stats")
        yield Input(placeholder="Message the cluster's model…", id="chat-input")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#chat-log").border_title = "chat"
        self.query_one(Input).focus()

    def on_screen_resume(self) -> None:
        self.query_one(Input).focus()

    @property
    def answer(self) -> str:
        """The text of the last assistant message on screen (for tests and scripts)."""
        found = self.query(ChatMessage).filter(".assistant")
        return found.last().text if found else ""

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.streaming:
            self.notify("wait for the answer to finish (or ctrl+l to clear)", severity="warning")
            return
        event.input.value = ""
        self.messages.append({"role": "user", "content": text})
        log = self.query_one("#chat-log", VerticalScroll)
        await log.mount(ChatMessage(role="user", text=text))
        reply = ChatMessage(role="assistant")
        await log.mount(reply)
        log.scroll_end(animate=False)
        self.streaming = True
        self.stream_answer(list(self.messages), reply)

    @work(group="chat", exclusive=True, exit_on_error=False)
    async def stream_answer(self, messages: list[dict[str, str]], reply: ChatMessage) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        timer = self.anyway.timer
        self.n_deltas = 0
        self._show_stats(Text("waiting for the first token…", style="dim"))
        started = timer()
        first: float | None = None
        parts: list[str] = []
        try:
            async for delta in self.anyway.source.chat_stream(messages):
                now = timer()
                if first is None:
                    first = now
                parts.append(delta)
                self.n_deltas = len(parts)
                reply.set_text("".join(parts))
                self._show_stats(self._stats(n=len(parts), started=started, first=first, now=now, done=False))
                log.scroll_end(animate=False)
        except SourceError as exc:
            self.notify(str(exc), title="chat failed", severity="error", markup=False)
            reply.add_class("error")
            reply.set_text("".join(parts) + ("\n" if parts else "") + f"[{exc}]")
            self._show_stats(Text(f"failed: {exc}", style="red"))
        else:
            end = timer()
            self._show_stats(self._stats(n=len(parts), started=started, first=first, now=end, done=True))
            if parts:
                self.messages.append({"role": "assistant", "content": "".join(parts)})
        finally:
            self.streaming = False

    def _show_stats(self, text: Text) -> None:
        self.stats = text.plain
        self.query_one("#chat-stats", Static).update(text)

    @staticmethod
    def _stats(*, n: int, started: float, first: float | None, now: float, done: bool) -> Text:
        text = Text()
        text.append(f"{n} tokens", style="bold")
        elapsed = now - started
        if first is not None and n > 1 and now > first:
            text.append(f"  {(n - 1) / (now - first):.1f} tok/s", style="bold green")
        if first is not None:
            text.append(f"  first token {first - started:.2f}s", style="dim")
        text.append(f"  {elapsed:.2f}s", style="dim")
        if not done:
            text.append("  streaming…", style="yellow")
        return text

    async def action_clear(self) -> None:
        self.workers.cancel_group(self, "chat")
        self.streaming = False
        self.messages.clear()
        await self.query_one("#chat-log", VerticalScroll).remove_children()
        self.n_deltas = 0
        self._show_stats(Text("conversation cleared", style="dim"))
        self.query_one(Input).focus()
