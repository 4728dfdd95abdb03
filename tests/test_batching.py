"""Continuous batching: concurrent requests are decoded together, and each output is
exactly what it would be alone (greedy)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI


def test_batched_outputs_equal_single_request_outputs(make_cluster, demo_model: Path, reference) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(demo_model, workers=2)
    c.wait_serving(nodes=2)
    url = c.url
    model_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    prompts = ["The sun rises in the", "My favourite food is", "In 1969, astronauts", "Python is a language that"]
    n = 48
    alone = {}
    for p in prompts:  # one at a time, through the same cluster
        r = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
            model=model_id, prompt=p, max_tokens=n, temperature=0)
        alone[p] = r.choices[0].text
        assert alone[p] == reference.complete(demo_model, p, n)[0]
    before = httpx.get(f"{url}/v1/cluster").json()["engine"]["stats"]
    together: dict[str, str] = {}
    gate = threading.Barrier(len(prompts))

    def ask(p: str) -> None:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        gate.wait()
        together[p] = client.completions.create(model=model_id, prompt=p, max_tokens=n, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    time.sleep(1.0)  # the engine reports its counters with its heartbeat
    after = httpx.get(f"{url}/v1/cluster").json()["engine"]["stats"]
    steps = after["steps"] - before["steps"]
    tokens = after["tokens"] - before["tokens"]
    # Decoded together: far fewer decode steps than tokens (alone it would be one per token).
    assert tokens >= len(prompts) * (n - 1) and steps < tokens * 0.6, (steps, tokens)
