"""The OpenAI-compatible API on a real cluster: bad input gets a clear 4xx, nothing breaks.

Every bad request below is followed by a good one that must still succeed; several
clients at once all get their own, correct answers.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from appliance.cli.up import LocalCluster

pytestmark = pytest.mark.slow

BAD_REQUESTS = [
    pytest.param("/v1/chat/completions", b"{not json", 400, "invalid_json", id="invalid-json"),
    pytest.param("/v1/chat/completions", b"[1, 2, 3]", 400, "invalid_request", id="body-not-object"),
    pytest.param("/v1/chat/completions", {"model": "MODEL"}, 400, "missing_required_parameter", id="missing-messages"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_required_parameter", id="missing-model"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": []}, 400, "invalid_value", id="empty-messages"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", id="bad-role"),
    pytest.param("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", id="unknown-model"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "invalid_value", id="negative-max-tokens"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "context_length_exceeded", id="absurd-max-tokens"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "invalid_value", id="temperature-too-high"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "invalid_value", id="top-p-zero"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "invalid_value", id="n-above-limit"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", id="too-many-stops"),
    pytest.param("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context_length_exceeded", id="oversize-prompt"),
    pytest.param("/v1/completions", {"model": "MODEL", "prompt": "x y z", "max_tokens": 2047, "stream": True}, 400, "context_length_exceeded", id="prompt-plus-max-tokens"),
    pytest.param("/v1/completions", {"model": "MODEL", "prompt": ""}, 400, "invalid_value", id="empty-prompt"),
    pytest.param("/v1/completions", {"model": "MODEL", "prompt": [1, 2, 99999999]}, 400, "invalid_value", id="token-out-of-vocab"),
    pytest.param("/v1/completions", {"model": "MODEL", "prompt": "hi", "seed": "abc"}, 400, "invalid_value", id="seed-not-int"),
    pytest.param("/v1/completions", b"x" * (2 << 20), 413, "request_too_large", id="body-too-large"),
    pytest.param("/v1/nope", {}, 404, "not_found", id="unknown-path"),
]


@pytest.fixture(scope="module")
def api_cluster(make_module_cluster, tiny_model: Path) -> LocalCluster:  # type: ignore[no-untyped-def]
    c = make_module_cluster(tiny_model, workers=2)
    c.wait_serving(nodes=2)
    return c


@pytest.fixture(scope="module")
def api(api_cluster: LocalCluster) -> tuple[str, str]:
    model_id = httpx.get(f"{api_cluster.url}/v1/models").json()["data"][0]["id"]
    return api_cluster.url, model_id


def good_request(url: str, model_id: str) -> None:
    c = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 5


@pytest.mark.parametrize("path, body, status, code", BAD_REQUESTS)
def test_bad_input_is_rejected_and_server_survives(api, path: str, body, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    url, model_id = api
    if isinstance(body, dict):
        data = json.dumps(body).replace('"MODEL"', json.dumps(model_id)).encode()
    else:
        data = body
    r = httpx.post(f"{url}{path}", content=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["message"] and err["type"]
    good_request(url, model_id)


def test_models_and_health(api) -> None:  # type: ignore[no-untyped-def]
    url, model_id = api
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == model_id
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    cluster = httpx.get(f"{url}/v1/cluster").json()
    assert {n["name"] for n in cluster["nodes"]} == {"w1", "w2"}
    for n in cluster["nodes"]:
        assert {"name", "address", "state", "layers", "memory"} <= set(n)
    assert cluster["plan"]["n_layers"] == 8 and cluster["engine"]["state"] == "serving"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'anyway_nodes{state="alive"} 2.0' in metrics and "anyway_tokens_generated_total" in metrics


def test_stop_sequences_and_finish_reasons(api, tiny_model: Path, reference) -> None:  # type: ignore[no-untyped-def]
    url, model_id = api
    c = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    prompt = "The three primary colors are"
    full, _ = reference.complete(tiny_model, prompt, 40)
    words = full.split()
    stop = words[3] if len(words) > 3 else words[-1]
    r = c.completions.create(model=model_id, prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    s = c.completions.create(model=model_id, prompt=prompt, max_tokens=40, temperature=0, stop=[stop], stream=True)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == full[: full.index(stop)]
    r = c.completions.create(model=model_id, prompt=prompt, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_sampling_with_seed_is_repeatable(api) -> None:  # type: ignore[no-untyped-def]
    url, model_id = api
    c = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    kw = dict(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    a = c.completions.create(**kw).choices[0].text
    b = c.completions.create(**kw).choices[0].text
    assert a == b


def test_concurrent_clients_all_get_correct_answers(api, tiny_model: Path, reference) -> None:  # type: ignore[no-untyped-def]
    url, model_id = api
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    expected = {p: reference.complete(tiny_model, p, 24)[0] for p in prompts}

    def ask(p: str) -> tuple[str, str]:
        c = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        if prompts.index(p) % 2:
            s = c.completions.create(model=model_id, prompt=p, max_tokens=24, temperature=0, stream=True)
            return p, "".join(ch.choices[0].text for ch in s if ch.choices)
        return p, c.completions.create(model=model_id, prompt=p, max_tokens=24, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = dict(pool.map(ask, prompts))
    assert results == expected


def in_flight(state: dict[str, Any]) -> dict[str, int]:
    """Work still going on: requests the head tracks (two views of one count) and what the
    engine process itself last reported in its heartbeat (every ~0.5 s)."""
    stats = state["engine"]["stats"]
    return {
        "head": state["throughput"]["requests_in_flight"],
        "head_engine": state["engine"]["requests_in_flight"],
        "engine": stats["active"] + stats["queued"],
    }


def idle(state: dict[str, Any]) -> bool:
    return not any(in_flight(state).values())


def test_client_disconnect_mid_stream_does_not_hurt(api_cluster: LocalCluster, tiny_model: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """A client that goes away mid-stream takes its request with it: the head forgets it and
    the engine stops decoding it at once, instead of running on to max_tokens for nobody."""
    c = api_cluster
    model_id = httpx.get(f"{c.url}/v1/models").json()["data"][0]["id"]
    prompt, max_tokens = "Tell me a long story", 500
    # What makes the checks below mean something: left alone, this request decodes all 500
    # tokens (greedy, no end of text before), i.e. seconds after the client has gone.
    assert reference.complete(tiny_model, prompt, max_tokens)[1] == max_tokens
    before = c.wait(idle, timeout_s=30, what="no work in flight before the request")["engine"]["stats"]
    during: dict[str, Any] | None = None
    with httpx.stream(
        "POST",
        f"{c.url}/v1/completions",
        json={"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:  # two chunks read; leaving the loop closes the connection
                during = c.cluster_state()
                break
    assert during is not None and in_flight(during)["head"] == 1, during and in_flight(during)

    # Idle in the head, and in an engine heartbeat sent after the request began (one that
    # counts its tokens: a heartbeat from before the request also says idle).
    def settled(s: dict[str, Any]) -> bool:
        return idle(s) and s["engine"]["stats"]["tokens"] > before["tokens"]

    after = c.wait(settled, timeout_s=5, what="the abandoned request to leave the head and the engine")
    # A request decoded on to the end would also be idle by now (500 tokens take ~2 s here):
    # what tells it apart is how many tokens the engine made.
    decoded = after["engine"]["stats"]["tokens"] - before["tokens"]
    assert decoded < max_tokens // 2, f"the engine decoded {decoded} tokens for a client that had gone"
    good_request(c.url, model_id)
