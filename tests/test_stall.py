"""A long prefill is progress, not a stall.

Found at 4 GB over the scale lab's LAN: a stream killed 1,000 tokens into its answer resumes
with one prefill of prompt + 1,000 tokens, about 90 s of compute on that machine, and no
token is sent meanwhile. The head's stall detector (no progress for ENGINE_STALL_TIMEOUT_S,
60 s) killed each new engine in the middle of it, over and over. Now the engine counts each
llama_decode pass when it completes and heartbeats between the passes of a step, and the
head counts a heartbeat whose pass count grew as progress.

The engine here is the real one on the demo model in this process (no workers needed for
what is tested: when passes complete and what is reported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.common import engine_protocol as ep
from appliance.common.config import EngineTiming
from appliance.core.planner import Plan
from appliance.engine.engine import N_BATCH, Engine
from appliance.head.engine_process import EngineProcess


def head_side(tmp_path: Path) -> EngineProcess:
    return EngineProcess(model_path="m.gguf", run_dir=tmp_path, n_ctx_seq=1024, max_batch=1, threads=1,
                         timing=EngineTiming(), on_event=lambda kind, msg: None)


def hb(*, active: int, decodes: int, tokens: int = 0) -> ep.Heartbeat:
    return ep.Heartbeat(active=active, queued=0, steps=0, tokens=tokens, decodes=decodes)


@pytest.mark.parametrize(
    ("before", "after", "progress"),
    [
        pytest.param(hb(active=1, decodes=3), hb(active=1, decodes=4), True, id="a-pass-completed"),
        pytest.param(hb(active=1, decodes=3), hb(active=1, decodes=3), False, id="no-pass-busy"),
        pytest.param(hb(active=1, decodes=3), hb(active=0, decodes=3), True, id="idle"),
    ],
)
def test_a_heartbeat_with_more_passes_is_progress(tmp_path: Path, before: ep.Heartbeat, after: ep.Heartbeat,
                                                  progress: bool) -> None:
    e = head_side(tmp_path)
    e.stats = before
    e.last_progress_at = 0.0
    e._handle(after)
    assert (e.last_progress_at > 0.0) is progress


def test_the_engine_reports_each_pass_of_a_long_prefill(demo_model: Path) -> None:
    """A prompt of 3 N_BATCH chunks: the owner hears of every pass before the first token."""
    sent: list[Any] = []
    plan = Plan(assignments=(), n_layers=30, n_ctx=4 * N_BATCH, strategy="speed", output_node="head")
    eng = Engine(model_path=str(demo_model), plan=plan, n_ctx_seq=4 * N_BATCH, max_batch=1, n_threads=1,
                 send=sent.append, draft_max=0)
    eng.load()
    seen: list[tuple[int, int]] = []  # (passes done, tokens sent) at each callback
    eng.on_decode = lambda: seen.append((eng.decodes, sum(isinstance(m, ep.Tokens) for m in sent)))
    prompt = tuple([1] + [28] * (3 * N_BATCH - 10))  # about 3 chunks
    eng.submit(ep.Submit(id="r1", tokens=prompt, max_new=2, replay=(28,) * 5))
    while eng.busy:
        eng.step()
    before_first_token = [p for p, t in seen if t == 0]
    assert before_first_token[:3] == [1, 2, 3], seen  # each prefill pass, as it completes
    assert eng.decodes == len(seen) and eng.prefilled == len(prompt) + 5
