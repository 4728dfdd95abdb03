"""The engine's per-request sampler chain, on the real engine with the real llama.cpp model.

The engine runs in this process over the tiny model with no RPC worker (the plan keeps every
layer on the local CPU): what is tested is the engine's own code, `Engine` and its
`SamplerChain`, not the cluster around it. What must hold:

* a request resumed with `replay` (what the head does after an engine restart) continues
  with exactly the tokens it would have sampled without the restart, for every sampling
  stage: penalties, grammar and the seeded random generator are restored;
* requests batched together with different settings each get what they get alone;
* a grammar that a replay breaks, or that allows no next token, ends that request with an
  error, and the engine goes on serving (llama.cpp would abort the process);
* logprobs are the model's distribution, consistent with the greedy choice.

Grammars come straight from llama-cpp-python's converter here (the head's checks around it
are tested in test_structured.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from appliance.common import engine_protocol as ep
from appliance.core.planner import Plan
from appliance.engine.engine import Engine
from appliance.head.text import Tokenizer

def schema_grammar(schema: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))


def json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 3},
        "size": {"type": "integer"},
    },
    "required": ["name", "tags", "size"],
}


class LocalEngine:
    """The engine with its messages collected instead of sent to a head."""

    def __init__(self, model: Path) -> None:
        self.sent: list[Any] = []
        plan = Plan(assignments=(), n_layers=8, n_ctx=512, strategy="speed", output_node="head")
        self.engine = Engine(model_path=str(model), plan=plan, n_ctx_seq=512, max_batch=4, n_threads=2,
                             send=self.sent.append)
        self.engine.load()

    def run(self, *submits: ep.Submit) -> dict[str, tuple[list[int], list[ep.Logprob | None], Any]]:
        """Submit all at once, step until idle: {id: (tokens, logprobs, Done or Error)}."""
        self.sent.clear()
        for s in submits:
            self.engine.submit(s)
        while self.engine.busy:
            self.engine.step()
        out: dict[str, tuple[list[int], list[ep.Logprob | None], Any]] = {s.id: ([], [], None) for s in submits}
        for m in self.sent:
            if isinstance(m, ep.Tokens):
                for it in m.items:
                    out[it.rid][0].append(it.token)
                    out[it.rid][1].append(it.logprob)
            elif isinstance(m, (ep.Done, ep.Error)):
                out[m.id] = (out[m.id][0], out[m.id][1], m)
        return out


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> LocalEngine:
    return LocalEngine(tiny_model)


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer(str(tiny_model))


def submit(tok: Tokenizer, rid: str, prompt: str, max_new: int, sampling: ep.Sampling, replay: tuple[int, ...] = ()) -> ep.Submit:
    return ep.Submit(id=rid, tokens=tuple(tok.encode(prompt)), max_new=max_new, sampling=sampling, replay=replay)


SETTINGS = [
    pytest.param(ep.Sampling(temperature=1.0, seed=7), id="seeded-temperature-1"),
    pytest.param(ep.Sampling(temperature=1.0, seed=8, presence_penalty=1.0, frequency_penalty=0.7, repeat_penalty=1.3),
                 id="seeded-penalties"),
    pytest.param(ep.Sampling(temperature=0.9, seed=9, top_k=20, top_p=0.9, min_p=0.02, logit_bias=((28, -5.0),)),
                 id="seeded-truncation-and-bias"),
    pytest.param(ep.Sampling(temperature=1.0, seed=10, grammar=schema_grammar(SCHEMA), frequency_penalty=0.3),
                 id="seeded-grammar"),
    pytest.param(ep.Sampling(temperature=0.0, grammar=json_object_grammar(), presence_penalty=0.5), id="greedy-grammar"),
]


@pytest.mark.parametrize("sampling", SETTINGS)
def test_a_resumed_request_samples_exactly_what_it_would_have(engine: LocalEngine, tok: Tokenizer, sampling: ep.Sampling) -> None:
    n, cut = 48, 11
    full, _, end = engine.run(submit(tok, "a", "Here is some JSON:", n, sampling))["a"]
    assert len(full) > cut + 5, (full, end)
    rest, _, end2 = engine.run(submit(tok, "b", "Here is some JSON:", n - cut, sampling, replay=tuple(full[:cut])))["b"]
    assert isinstance(end2, ep.Done) and full[cut:] == rest


def test_without_the_restored_state_the_continuation_differs(engine: LocalEngine, tok: Tokenizer) -> None:
    """What the test above relies on: a fresh chain (the RNG at its start, no penalty
    history) would sample something else at the same position."""
    s = ep.Sampling(temperature=1.0, seed=8, presence_penalty=1.0, frequency_penalty=0.7)
    prompt = "Here is some JSON:"
    full, _, _ = engine.run(submit(tok, "a", prompt, 40, s))["a"]
    fresh, _, _ = engine.run(submit(tok, "b", prompt + tok.piece(full[0]).decode(), 39, s))["b"]
    assert fresh != full[1:]


def test_batched_requests_with_different_settings_get_what_they_get_alone(engine: LocalEngine, tok: Tokenizer) -> None:
    reqs = [
        submit(tok, "greedy", "The sun rises in the", 24, ep.Sampling()),
        submit(tok, "seeded", "My favourite food is", 24, ep.Sampling(temperature=1.0, seed=3, top_k=30)),
        submit(tok, "penalised", "In 1969, astronauts", 24, ep.Sampling(frequency_penalty=1.5, logit_bias=((28, -100.0),))),
        submit(tok, "json", "JSON:", 24, ep.Sampling(temperature=0.7, seed=4, grammar=schema_grammar(SCHEMA), logprobs=2)),
    ]
    alone = {r.id: engine.run(r)[r.id][0] for r in reqs}
    together = {rid: v[0] for rid, v in engine.run(*reqs).items()}
    assert together == alone
    assert 28 not in alone["penalised"]


def test_a_replay_that_breaks_the_grammar_is_an_error_and_the_engine_serves_on(engine: LocalEngine, tok: Tokenizer) -> None:
    s = ep.Sampling(grammar=json_object_grammar())
    out = engine.run(submit(tok, "bad", "JSON:", 8, s, replay=tuple(tok.encode(" hello", add_bos=False))))["bad"]
    assert isinstance(out[2], ep.Error) and "grammar" in out[2].error and not out[0]
    assert len(engine.run(submit(tok, "next", "Hello", 5, ep.Sampling()))["next"][0]) == 5


def test_a_grammar_with_no_next_token_is_an_error_not_an_abort(engine: LocalEngine, tok: Tokenizer) -> None:
    # NUL is never a token piece the grammar sampler considers: nothing can follow "a".
    out = engine.run(submit(tok, "dead", "Hello", 5, ep.Sampling(grammar='root ::= "a" [\\x00]')))["dead"]
    assert isinstance(out[2], ep.Error) and "no next token" in out[2].error
    assert len(engine.run(submit(tok, "next", "Hello", 5, ep.Sampling()))["next"][0]) == 5


def test_logprobs_are_the_models_distribution_and_agree_with_greedy(engine: LocalEngine, tok: Tokenizer) -> None:
    toks, lps, _ = engine.run(submit(tok, "lp", "The capital of France is", 12, ep.Sampling(logprobs=5)))["lp"]
    assert len(toks) == len(lps) == 12
    for t, lp in zip(toks, lps):
        assert lp is not None and len(lp.top) == 5
        assert lp.top[0][0] == t and lp.top[0][1] == pytest.approx(lp.logprob)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
    # Sampling stages do not change what is reported: the same position, biased, reports
    # the same distribution while choosing another token.
    banned = toks[0]
    toks2, lps2, _ = engine.run(submit(tok, "lp2", "The capital of France is", 1,
                                       ep.Sampling(logprobs=5, logit_bias=((banned, -100.0),))))["lp2"]
    assert toks2[0] != banned and lps2[0] is not None
    assert [t for t, _ in lps2[0].top] == [t for t, _ in lps[0].top]
    assert [v for _, v in lps2[0].top] == pytest.approx([v for _, v in lps[0].top])
