"""Continuous batching: concurrent requests are decoded together, and each output is
exactly what it would be alone (greedy)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import wait_until
from openai import OpenAI

pytestmark = pytest.mark.slow


def engine_stats_after(url: str, tokens: int) -> dict[str, Any] | None:
    """The engine's counters (sent with its heartbeat, every ~0.5 s) once it is idle and has
    reported at least `tokens` tokens since it started, i.e. once they include every request
    made so far; else None."""
    stats = httpx.get(f"{url}/v1/cluster").json()["engine"]["stats"]
    return stats if not stats["active"] and not stats["queued"] and stats["tokens"] >= tokens else None


def test_batched_outputs_equal_single_request_outputs(make_cluster, demo_model: Path, reference) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(demo_model, workers=2)
    c.wait_serving(nodes=2)
    url = c.url
    model_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    prompts = ["The sun rises in the", "My favourite food is", "In 1969, astronauts", "Python is a language that"]
    n = 48
    alone = {}
    made = 0  # completion tokens so far, all through this cluster's one engine
    for p in prompts:  # one at a time, through the same cluster
        r = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
            model=model_id, prompt=p, max_tokens=n, temperature=0)
        alone[p] = r.choices[0].text
        made += r.usage.completion_tokens
        assert alone[p] == reference.complete(demo_model, p, n)[0]
    before = wait_until(lambda: engine_stats_after(url, made), timeout_s=10,
                        what=f"engine counters with the {made} tokens made one at a time")
    together: dict[str, str] = {}
    gate = threading.Barrier(len(prompts))
    lock = threading.Lock()

    def ask(p: str) -> None:
        nonlocal made
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        gate.wait()
        r = client.completions.create(model=model_id, prompt=p, max_tokens=n, temperature=0)
        together[p] = r.choices[0].text
        with lock:
            made += r.usage.completion_tokens

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    after = wait_until(lambda: engine_stats_after(url, made), timeout_s=10,
                       what=f"engine counters with all {made} tokens made")
    steps = after["steps"] - before["steps"]
    tokens = after["tokens"] - before["tokens"]
    # Decoded together: far fewer decode steps than tokens (alone it would be one per token).
    assert tokens >= len(prompts) * (n - 1) and steps < tokens * 0.6, (steps, tokens)
