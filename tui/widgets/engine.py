"""Engine and health at a glance: serving / loading (with a progress bar) / recovering / degraded.

One line names the model and the engine's state; while the engine loads, a progress
bar follows the head's `engine.progress`; when the cluster is not healthy its reason
(or the engine's last error) is shown underneath, in the health's colour.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from ..format import ENGINE_STATE_STYLE, HEALTH_STYLE, as_float, as_int, fmt_age

LOADING_STATES = frozenset({"starting", "loading"})


class EngineStatus(Vertical):
    """Health, engine state, model; a load progress bar; the reason when not healthy."""

    def compose(self) -> ComposeResult:
        yield Static(id="engine-line")
        with Horizontal(id="engine-loading"):
            yield Label("loading ", id="engine-loading-label")
            yield ProgressBar(total=100, show_eta=False, id="engine-progress")
        yield Static(id="engine-reason")

    def on_mount(self) -> None:
        self.query_one("#engine-loading").display = False
        self.query_one("#engine-reason").display = False

    def show_cluster(self, cluster: dict[str, Any] | None) -> None:
        line = self.query_one("#engine-line", Static)
        loading = self.query_one("#engine-loading")
        reason_w = self.query_one("#engine-reason", Static)
        if not cluster:
            line.update(Text("waiting for the head…", style="dim"))
            loading.display = reason_w.display = False
            return
        health = cluster.get("health") or {}
        status = str(health.get("status") or "?")
        engine = cluster.get("engine") or {}
        state = str(engine.get("state") or "?")
        model = cluster.get("model") or {}
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("● ", style=HEALTH_STYLE.get(status, ""))
        text.append(status, style=HEALTH_STYLE.get(status, ""))
        text.append("  engine ", style="dim")
        text.append(state, style=ENGINE_STATE_STYLE.get(state, ""))
        if engine.get("generation"):
            text.append(f" #{engine['generation']}", style="dim")
        restarts = as_int(engine.get("restarts"))
        text.append(f"  restarts {restarts}", style="yellow" if restarts else "dim")
        if cluster.get("uptime_s") is not None:
            text.append(f"  up {fmt_age(cluster['uptime_s'])}", style="dim")
        text.append("  ")
        text.append(str(model.get("id") or "?"), style="bold")
        if model.get("n_layers"):
            text.append(f" ({model['n_layers']} layers)", style="dim")
        line.update(text)

        loading.display = state in LOADING_STATES
        if loading.display:
            progress = as_float(engine.get("progress")) or 0.0
            self.query_one("#engine-progress", ProgressBar).update(progress=round(progress * 100, 1))
        reason = str(health.get("reason") or "")
        if status != "ok" and not reason:
            reason = str(engine.get("last_error") or "")
        if state == "failed" and engine.get("last_error"):
            reason = f"engine failed: {engine['last_error']}"
        reason_w.display = bool(reason) and status != "ok"
        if reason_w.display:
            reason_w.update(Text(f"{status}: {reason}", style=HEALTH_STYLE.get(status, "yellow")))
