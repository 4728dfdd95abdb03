"""OpenAI API parity on a real cluster (tiny model, 2 workers), through the real `openai` client:
structured outputs, logprobs, the full sampling set, n > 1, and resuming with all of them.

Sampling parameters are checked against their definitions, not against recorded outputs:
the logprobs the server reports are the model's own distribution at each position, so what
a stage may and may not choose is computable from them (min_p, top_p, penalties, bias).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psutil
import pytest
from helpers import engine_pid, served_model
from openai import OpenAI

from appliance.cli.up import LocalCluster
from appliance.head.text import Tokenizer

pytestmark = pytest.mark.slow

SEEDS = range(100, 120)  # 20 seeds, run concurrently
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer"},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 16}, "verified": {"type": "boolean"}},
            "required": ["name", "verified"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "nickname": {"type": ["string", "null"], "maxLength": 10},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def cluster(make_module_cluster: Any, tiny_model: Path) -> LocalCluster:
    c = make_module_cluster(tiny_model, workers=2, max_batch=8)
    c.wait_serving(nodes=2)
    return c


@pytest.fixture(scope="module")
def model_id(cluster: LocalCluster) -> str:
    return served_model(cluster.url)


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def token_ids(tiny_model: Path) -> dict[bytes, int]:
    """Token bytes → id (the logprobs name tokens by their text and bytes)."""
    tok = Tokenizer(str(tiny_model))
    out: dict[bytes, int] = {}
    for i in range(tok.vocab_size):
        b = tok.piece(i)
        if b and b not in out:
            out[b] = i
    return out


def ids_of(entries: Any, token_ids: dict[bytes, int]) -> list[int]:
    return [token_ids[bytes(e.bytes)] for e in entries]


def run_all(fn: Any, args: list[Any]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(args)) as pool:
        return list(pool.map(fn, args))


# ------------------------------------------------------------------ models
def test_models_shows_the_context_and_what_the_model_supports(cluster: LocalCluster) -> None:
    m = httpx.get(f"{cluster.url}/v1/models").json()["data"][0]
    assert m["context_length"] == m["meta"]["n_ctx"] == 2048
    caps = m["meta"]["capabilities"]
    # SmolLM2's template ignores `tools`: tools are served in the generic format.
    assert caps["tools"] is False and caps["tool_call_format"] == "generic"
    assert caps["structured_outputs"] and caps["logprobs"] and caps["max_n"] >= 2


# -------------------------------------------------------------- validation
BAD = [
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 17}, "n"),
    ({"seed": "abc"}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://evil.example/s"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "number", "multipleOf": 3}}}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
     "tools.1.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}, "messages.1"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     "messages.1.tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0"),
]


@pytest.mark.parametrize("extra, param", BAD, ids=[p for _, p in BAD])
def test_every_new_field_is_validated_with_the_openai_error_shape(cluster: LocalCluster, model_id: str,
                                                                   client: OpenAI, extra: dict[str, Any], param: str) -> None:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
    ok = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    assert ok.usage is not None and ok.usage.completion_tokens == 3


def test_an_unsupported_schema_feature_is_named_in_the_error(cluster: LocalCluster, model_id: str) -> None:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}}}}
    err = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=60).json()["error"]
    assert "'minimum' is not supported (at #/properties/age)" in err["message"] and err["code"] == "unsupported_schema"


# ------------------------------------------------------- structured outputs
def test_json_schema_output_always_validates(client: OpenAI, model_id: str) -> None:
    def ask(seed: int) -> tuple[str, str | None]:
        r = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Describe a pet as JSON."}],
            temperature=1.0, seed=seed, max_tokens=400, response_format=SCHEMA_FORMAT,  # type: ignore[arg-type]
        )
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    results = run_all(ask, list(SEEDS))
    for text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({t for t, _ in results}) > len(results) // 2  # many different answers, all valid


def test_json_object_output_is_a_json_object(client: OpenAI, model_id: str) -> None:
    def ask(seed: int) -> tuple[str, str | None]:
        r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Some JSON please"}],
                                           temperature=1.0, seed=seed, max_tokens=200,
                                           response_format={"type": "json_object"})
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    # Any JSON object may be unbounded (a string can go on until max_tokens): every output
    # that ends is an object, and most do end.
    results = run_all(ask, list(range(8)))
    ended = [text for text, finish in results if finish == "stop"]
    assert len(ended) >= len(results) // 2, results
    assert all(isinstance(json.loads(text), dict) for text in ended)


def test_completions_take_a_response_format_too(client: OpenAI, model_id: str) -> None:
    r = client.completions.create(model=model_id, prompt="A pet:", max_tokens=400, temperature=0.8, seed=3,
                                  extra_body={"response_format": SCHEMA_FORMAT})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


# ----------------------------------------------------------------- logprobs
def test_chat_logprobs_agree_with_the_greedy_choice_streamed_or_not(client: OpenAI, model_id: str) -> None:
    kw: dict[str, Any] = dict(model=model_id, messages=[{"role": "user", "content": "Name three colours."}],
                              temperature=0, max_tokens=16, logprobs=True, top_logprobs=5)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].message.content or ""
    entries = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(entries) == r.usage.completion_tokens == 16  # type: ignore[union-attr]
    assert b"".join(bytes(e.bytes) for e in entries).decode() == content
    for e in entries:
        assert len(e.top_logprobs) == 5 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    streamed = [e for ch in client.chat.completions.create(**kw, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content or []]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completion_logprobs_have_offsets_into_the_text_and_stop_where_the_text_stops(client: OpenAI, model_id: str) -> None:
    kw: dict[str, Any] = dict(model=model_id, prompt="The three primary colors are", temperature=0, max_tokens=24, logprobs=3)
    full = client.completions.create(**kw).choices[0]
    lp = full.logprobs
    assert lp is not None and lp.tokens and lp.text_offset and lp.top_logprobs
    assert "".join(lp.tokens) == full.text
    assert [full.text[a:b] for a, b in zip(lp.text_offset, lp.text_offset[1:] + [len(full.text)])] == lp.tokens
    assert all(len(t) == 3 for t in lp.top_logprobs)
    stop = full.text.split()[3]
    cut = client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.logprobs is not None
    assert cut.logprobs.tokens == lp.tokens[: len(cut.logprobs.tokens)]
    assert all(o < len(cut.text) for o in cut.logprobs.text_offset or [])
    assert "".join(cut.logprobs.tokens).startswith(cut.text)
    chunks = client.completions.create(**kw, stream=True)
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens or []]
    assert streamed == lp.tokens


# ----------------------------------------------------------------- sampling
def sampled(client: OpenAI, model_id: str, *, prompt: str = "Once upon a time", n: int = 16, top: int = 20,
            **kw: Any) -> Any:
    """Chat completion with the model's top logprobs at each sampled position."""
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=n, logprobs=True, top_logprobs=top, **kw)
    return r.choices[0].logprobs.content  # type: ignore[union-attr]


def test_top_k_1_is_greedy_at_any_seed(client: OpenAI, model_id: str) -> None:
    greedy = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=24, temperature=0).choices[0].text
    for seed in (1, 2, 3):
        r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=24, temperature=1.0,
                                      seed=seed, extra_body={"top_k": 1})
        assert r.choices[0].text == greedy


def test_min_p_keeps_only_tokens_near_the_most_likely(client: OpenAI, model_id: str) -> None:
    def worst_ratio(min_p: float) -> float:
        runs = run_all(lambda s: sampled(client, model_id, temperature=1.0, seed=s, extra_body={"min_p": min_p}),
                       list(range(8)))
        return min(e.logprob - e.top_logprobs[0].logprob for es in runs for e in es)

    assert worst_ratio(0.3) >= math.log(0.3) - 1e-3  # p(token) >= 0.3 * p(most likely), always
    assert worst_ratio(0.0) < math.log(0.3)  # without it, such tokens are sampled


def test_top_p_samples_only_from_the_nucleus(client: OpenAI, model_id: str) -> None:
    def mass_above_choices(top_p: float) -> list[float]:
        runs = run_all(lambda s: sampled(client, model_id, temperature=1.0, seed=s, top_p=top_p), list(range(8)))
        out = []
        for es in runs:
            for e in es:
                tops = [t.token for t in e.top_logprobs]
                rank = tops.index(e.token) if e.token in tops else len(tops)
                out.append(sum(math.exp(t.logprob) for t in e.top_logprobs[:rank]))
        return out

    assert max(mass_above_choices(0.5)) < 0.5 + 1e-3  # tokens more likely than the choice hold < top_p
    assert max(mass_above_choices(1.0)) >= 0.5


def test_logit_bias_bans_and_forces_tokens(client: OpenAI, model_id: str, token_ids: dict[bytes, int]) -> None:
    greedy = sampled(client, model_id, temperature=0, top=1, n=24)
    banned = ids_of(greedy, token_ids)[0]
    out = ids_of(sampled(client, model_id, temperature=0, top=1, n=24, logit_bias={str(banned): -100}), token_ids)
    assert banned in ids_of(greedy, token_ids) and banned not in out
    forced = token_ids[b" spare"]
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        out = ids_of(sampled(client, model_id, top=1, n=8, logit_bias={str(forced): 100}, **kw), token_ids)
        assert out == [forced] * 8


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_follow_their_definition(client: OpenAI, model_id: str, token_ids: dict[bytes, int], penalty: str) -> None:
    """Greedy under a penalty picks argmax(logprob - frequency * count - presence * [count > 0])
    over the tokens generated so far: checked at every position from the reported logprobs."""
    value = 1.5
    plain = sampled(client, model_id, temperature=0, n=32, top=1)
    entries = sampled(client, model_id, temperature=0, n=32, **{penalty: value})
    assert ids_of(entries, token_ids) != ids_of(plain, token_ids)  # the penalty changed the output
    counts: dict[int, int] = {}
    checked = 0
    for e in entries:
        chosen = token_ids[bytes(e.bytes)]
        scores = {}
        for t in e.top_logprobs:
            tid = token_ids[bytes(t.bytes)]
            c = counts.get(tid, 0)
            scores[tid] = t.logprob - (value * c if penalty == "frequency_penalty" else value * (c > 0))
        if chosen in scores:
            best = max(scores.values())
            assert scores[chosen] == pytest.approx(best, abs=1e-3), (e.token, scores)
            checked += 1
        counts[chosen] = counts.get(chosen, 0) + 1
    assert checked >= len(entries) // 2


def test_repeat_penalty_makes_greedy_output_less_repetitive(client: OpenAI, model_id: str) -> None:
    def distinct(**kw: Any) -> int:
        r = client.completions.create(model=model_id, prompt="and and and", max_tokens=48, temperature=0, logprobs=0,
                                      **kw)
        return len(set(r.choices[0].logprobs.tokens))  # type: ignore[union-attr, arg-type]

    assert distinct(extra_body={"repeat_penalty": 1.5}) > distinct()


def test_higher_temperature_samples_less_likely_tokens(client: OpenAI, model_id: str) -> None:
    def mean_logprob(t: float) -> float:
        runs = run_all(lambda s: sampled(client, model_id, temperature=t, seed=s, top=0), list(range(8)))
        lps = [e.logprob for es in runs for e in es]
        return sum(lps) / len(lps)

    assert mean_logprob(0.3) > mean_logprob(1.0) > mean_logprob(1.8)


def test_seed_repeats_and_different_seeds_differ(client: OpenAI, model_id: str) -> None:
    def text(seed: int) -> str:
        return client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    assert text(42) == text(42)
    assert len(set(run_all(text, list(range(10))))) >= 5


def test_n_choices_are_the_seeded_requests_run_together(client: OpenAI, model_id: str) -> None:
    kw: dict[str, Any] = dict(model=model_id, prompt="My favourite food is", max_tokens=16, temperature=1.0)
    together = client.completions.create(**kw, n=3, seed=7)
    assert [c.index for c in together.choices] == [0, 1, 2]
    alone = [client.completions.create(**kw, seed=7 + i).choices[0].text for i in range(3)]
    assert [c.text for c in together.choices] == alone
    assert together.usage is not None and together.usage.completion_tokens == 48
    texts: dict[int, str] = {}
    usage = None
    for ch in client.completions.create(**kw, n=3, seed=7, stream=True, stream_options={"include_usage": True}):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = ch.usage or usage
    assert [texts[i] for i in range(3)] == alone
    assert usage is not None and usage.completion_tokens == 48
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=8, temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_max_completion_tokens_and_usage_in_the_stream(client: OpenAI, model_id: str) -> None:
    kw: dict[str, Any] = dict(model=model_id, messages=[{"role": "user", "content": "Tell me a story"}],
                              max_completion_tokens=7, temperature=0)
    r = client.chat.completions.create(**kw)
    assert r.usage is not None and r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage


# -------------------------------------------------------------- independence
def test_batched_requests_with_different_settings_stay_independent(client: OpenAI, model_id: str) -> None:
    msgs = [{"role": "user", "content": "Tell me about dogs."}]
    requests: list[dict[str, Any]] = [
        dict(temperature=0),
        dict(temperature=1.0, seed=11, extra_body={"top_k": 20, "min_p": 0.05}),
        dict(temperature=0, presence_penalty=1.0, frequency_penalty=0.5, extra_body={"repeat_penalty": 1.2}),
        dict(temperature=0, logit_bias={"28": -100, "30": 5}),
        dict(temperature=1.0, seed=12, response_format=SCHEMA_FORMAT),
        dict(temperature=0.8, seed=13, top_p=0.8, logprobs=True, top_logprobs=3),
    ]

    def ask(kw: dict[str, Any]) -> Any:
        r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=40, **kw)
        lp = r.choices[0].logprobs
        return r.choices[0].message.content, lp and [(e.token, round(e.logprob, 5)) for e in lp.content or []]

    alone = [ask(kw) for kw in requests]
    gate = threading.Barrier(len(requests))

    def together(kw: dict[str, Any]) -> Any:
        gate.wait()
        return ask(kw)

    assert run_all(together, requests) == alone


# ------------------------------------------------------------------- resume
def test_resume_mid_stream_keeps_the_grammar_and_the_sampler_state(cluster: LocalCluster, client: OpenAI,
                                                                   model_id: str) -> None:
    """The engine is killed mid-stream; the resumed request keeps its grammar (the output is
    still valid JSON) and its sampler state: with the replay re-decoded one token per step,
    the seeded stream is exactly the uninterrupted one."""
    kw: dict[str, Any] = dict(model=model_id, messages=[{"role": "user", "content": "Describe a pet as JSON."}],
                              temperature=1.0, seed=21, frequency_penalty=0.3, max_tokens=400,
                              response_format=SCHEMA_FORMAT)
    expected = client.chat.completions.create(**kw).choices[0].message.content or ""
    pid = engine_pid(cluster)
    parts = []
    for i, ch in enumerate(client.chat.completions.create(**kw, stream=True)):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        if i == 10:
            psutil.Process(pid).send_signal(signal.SIGKILL)
    text = "".join(parts)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == expected
    state = cluster.wait(lambda s: s["health"]["status"] == "ok" and s["engine"]["state"] == "serving",
                         timeout_s=60, what="a new engine serving")
    assert state["engine"]["restarts"] >= 1 and engine_pid(cluster) != pid
