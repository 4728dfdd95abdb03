"""Engine and health at a glance: serving / loading (with a progress bar) / recovering / degraded.

One line names the model and the engine's state; while the engine loads, a progress
bar follows the head's `engine.progress`, and a line shows what each worker has received
so far and how fast; when the cluster is not healthy its reason (or the engine's last
error) is shown underneath, in the health's colour. A line shows speculative decoding:
where drafts come from and how many of the drafted tokens the model accepted.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from appliance.common.kinds import EngineState, HealthState
from appliance.common.status import ClusterStatus, SpeculationStatus

from ..format import ENGINE_STATE_STYLE, HEALTH_STYLE, fmt_age, fmt_bytes

LOADING_STATES = frozenset({EngineState.STARTING, EngineState.LOADING})


SPEC_SOURCE = {"prompt": "drafts from the prompt", "model": "draft model"}


def speculation_line(spec: SpeculationStatus) -> Text:
    """`speculation  drafts from the prompt · 62% of 1,234 drafted tokens accepted`."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append("speculation  ", style="dim")
    if spec.mode == "off":
        text.append("off", style="dim")
        return text
    text.append(SPEC_SOURCE.get(spec.mode, spec.mode))
    if spec.draft_model:
        text.append(f" {spec.draft_model}", style="bold")
    if not spec.default:
        text.append(" (only when a request asks)", style="dim")
    if spec.acceptance is None:
        text.append(" · nothing drafted yet", style="dim")
    else:
        text.append(f" · {spec.acceptance:.0%}", style="bold green" if spec.acceptance >= 0.5 else "yellow")
        text.append(f" of {spec.drafted:,} drafted tokens accepted", style="dim")
    return text


class EngineStatus(Vertical):
    """Health, engine state, model; a load progress bar; the reason when not healthy."""

    def compose(self) -> ComposeResult:
        yield Static(id="engine-line")
        with Horizontal(id="engine-loading"):
            yield Label("loading ", id="engine-loading-label")
            yield ProgressBar(total=100, show_eta=False, id="engine-progress")
        yield Static(id="engine-load-nodes")
        yield Static(id="engine-spec")
        yield Static(id="engine-reason")

    def on_mount(self) -> None:
        self.query_one("#engine-loading").display = False
        self.query_one("#engine-load-nodes").display = False
        self.query_one("#engine-reason").display = False

    def show_cluster(self, cluster: ClusterStatus | None) -> None:
        line = self.query_one("#engine-line", Static)
        loading = self.query_one("#engine-loading")
        reason_w = self.query_one("#engine-reason", Static)
        if cluster is None:
            line.update(Text("waiting for the head…", style="dim"))
            loading.display = reason_w.display = False
            return
        health, engine, model = cluster.health, cluster.engine, cluster.model
        status, state = health.status, engine.state
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("● ", style=HEALTH_STYLE[status])
        text.append(status.value, style=HEALTH_STYLE[status])
        text.append("  engine ", style="dim")
        text.append(state.value, style=ENGINE_STATE_STYLE[state])
        if engine.generation:
            text.append(f" #{engine.generation}", style="dim")
        text.append(f"  restarts {engine.restarts}", style="yellow" if engine.restarts else "dim")
        text.append(f"  up {fmt_age(cluster.uptime_s)}", style="dim")
        text.append("  ")
        text.append(model.id or "?", style="bold")
        if model.n_layers:
            text.append(f" ({model.n_layers} layers)", style="dim")
        line.update(text)

        loading.display = state in LOADING_STATES
        per_node = self.query_one("#engine-load-nodes", Static)
        per_node.display = loading.display and bool(engine.load)
        if loading.display:
            self.query_one("#engine-progress", ProgressBar).update(progress=round(engine.progress * 100, 1))
        if per_node.display:
            parts = Text(no_wrap=True, overflow="ellipsis")
            for i, p in enumerate(engine.load):
                parts.append("  " if i else "", style="dim")
                parts.append(p.node, style="bold")
                parts.append(f" {fmt_bytes(p.bytes)}/{fmt_bytes(p.total_bytes)} {fmt_bytes(p.bytes_per_s)}/s", style="dim")
            per_node.update(parts)
        self.query_one("#engine-spec", Static).update(speculation_line(engine.speculation))
        healthy = status == HealthState.OK
        reason = health.reason or ("" if healthy else engine.last_error)
        if state == EngineState.FAILED and engine.last_error:
            reason = f"engine failed: {engine.last_error}"
        reason_w.display = bool(reason) and not healthy
        if reason_w.display:
            reason_w.update(Text(f"{status.value}: {reason}", style=HEALTH_STYLE[status]))
