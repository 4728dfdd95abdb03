"""Correctness first: a model split over real RPC workers answers exactly like one process.

Each cluster here is real: a head process, an engine process, and 2 or 3 worker agents
each running a ggml RPC server on loopback TCP. Requests go through the real HTTP API
with the real `openai` client; the reference is the same GGUF in one plain
llama-cpp-python process, greedy decoding on both sides.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

PROMPTS = [
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "def fibonacci(n):",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name two planets."}],
]


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def stream_text(stream) -> str:  # type: ignore[no-untyped-def]
    parts = []
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta if hasattr(chunk.choices[0], "delta") else None
            parts.append((delta.content if delta is not None else chunk.choices[0].text) or "")
    return "".join(parts)


def check_cluster(cluster, model: Path, reference, *, n_tokens: int) -> None:  # type: ignore[no-untyped-def]
    c = client(cluster.url)
    model_id = c.models.list().data[0].id
    for prompt in PROMPTS:
        want, want_n = reference.complete(model, prompt, n_tokens)
        got = c.completions.create(model=model_id, prompt=prompt, max_tokens=n_tokens, temperature=0)
        assert got.choices[0].text == want, prompt
        assert got.usage.completion_tokens == want_n
        streamed = c.completions.create(model=model_id, prompt=prompt, max_tokens=n_tokens, temperature=0, stream=True)
        assert stream_text(streamed) == want, f"stream: {prompt}"
    for messages in CHATS:
        want, want_n = reference.chat(model, messages, n_tokens)
        got = c.chat.completions.create(model=model_id, messages=messages, max_tokens=n_tokens, temperature=0)
        assert got.choices[0].message.content == want
        assert got.usage.completion_tokens == want_n
        streamed = c.chat.completions.create(
            model=model_id, messages=messages, max_tokens=n_tokens, temperature=0, stream=True
        )
        assert stream_text(streamed) == want


@pytest.mark.parametrize("workers", [2, 3])
def test_small_model_split_matches_one_process(make_cluster, tiny_model: Path, reference, workers: int) -> None:
    cluster = make_cluster(tiny_model, workers=workers)
    state = cluster.wait_serving(nodes=workers)
    spans = sorted(tuple(n["layers"]) for n in state["nodes"] if n["layers"])
    assert spans[0][0] == 0 and spans[-1][1] == 8 and len(spans) == workers
    check_cluster(cluster, tiny_model, reference, n_tokens=48)


def test_demo_model_split_matches_one_process(make_cluster, demo_model: Path, reference) -> None:
    cluster = make_cluster(demo_model, workers=3)
    state = cluster.wait_serving(nodes=3)
    assert {n["name"] for n in state["nodes"] if n["layers"]} == {"w1", "w2", "w3"}
    assert state["plan"]["tensor_split"] and len(state["plan"]["rpc_endpoints"]) == 3
    check_cluster(cluster, demo_model, reference, n_tokens=64)
