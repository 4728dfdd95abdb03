"""Resuming an answer after the engine is lost costs one batched prefill, and changes nothing.

Real cluster, real fault: a worker holding layers is SIGKILLed late in a streamed answer.
The new engine brings prompt + tokens already sent into its KV cache in one batched pass
(counted by the engine's own heartbeat counters, seen in /v1/cluster), not one decode
step per token already sent, and the client's text is still the no-fault text exactly.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from helpers import wait_until

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, in a land far away,"
N_TOKENS = 300
KILL_AFTER = 200


def test_a_late_resume_costs_one_batched_prefill_and_keeps_the_text(make_cluster, demo_model: Path, reference) -> None:  # type: ignore[no-untyped-def]
    expected, n = reference.complete(demo_model, PROMPT, N_TOKENS)
    assert n == N_TOKENS
    c = make_cluster(demo_model, workers=3)
    c.wait_serving(nodes=3)
    gen0 = c.cluster_state()["engine"]["generation"]
    client = OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    prompt_tokens = 0
    parts: list[str] = []
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            prompt_tokens = chunk.usage.prompt_tokens
        if chunk.choices and chunk.choices[0].text:
            parts.append(chunk.choices[0].text)
            if len(parts) == KILL_AFTER:
                c.procs["w2"].send_signal(signal.SIGKILL)
    assert "".join(parts) == expected  # the answer is the one a fault-free run writes

    def settled() -> dict | None:  # type: ignore[type-arg]
        s = c.cluster_state()
        eng = s["engine"] if s else None
        if eng and eng["generation"] > gen0 and eng["stats"]["active"] == 0 and eng["stats"]["tokens"] > 0:
            return eng
        return None

    eng = wait_until(settled, timeout_s=15, what="the new engine's counters after the answer")
    stats = eng["stats"]
    # Everything the first engine had sent came back in one prefill (with the prompt) ...
    assert stats["prefilled"] >= prompt_tokens + KILL_AFTER - 5
    # ... and the new engine decoded one step per token it produced, not one per token replayed.
    produced_after = stats["tokens"]
    assert produced_after <= N_TOKENS - KILL_AFTER + 5
    assert stats["steps"] <= produced_after + 1, stats
    assert stats["decodes"] <= stats["steps"] + (prompt_tokens + N_TOKENS) // 512 + 1, stats
    assert httpx.get(f"{c.url}/metrics").text.count("anyway_requests_resumed_total 1.0") == 1
