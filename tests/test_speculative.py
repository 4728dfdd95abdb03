"""Speculative decoding in the engine: drafted tokens change the speed, never a token.

The engine runs in this process over the demo model with no RPC worker (every layer on the
local CPU), like tests/test_sampling.py: what is tested is the engine's own code (drafting,
one batched pass per step, verification with each request's sampler chain, removal of
rejected drafts from the KV cache). The same requests run on an engine that never
speculates (`draft_max=0`) and on engines that check drafts at every step they have any
(`draft_min`: this 2-core machine's compute-bound passes would make the adaptive length
choose few drafts, and a draft that is never checked proves nothing). Drafts come from the
prompt (prompt lookup) or from a draft model (the demo model's first 8 layers, same
vocabulary). What must hold, token for token and logprob for logprob: greedy output, and
seeded sampling at any temperature (the acceptance rule costs the sampler exactly one draw
per emitted token), alone and batched, with grammars and penalties, and for a request
resumed with `replay`. A draft model with another vocabulary is refused at load.

The adaptive draft length is tested on its parts (`appliance.engine.drafting`): the
acceptance estimate, the pass-cost fit and the choice of length, which drops to zero when
drafts keep failing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from appliance.common import engine_protocol as ep
from appliance.core.planner import Plan
from appliance.engine.drafting import (
    Acceptance,
    DraftModelError,
    NgramDrafts,
    PassCost,
    choose_length,
    expected_tokens,
)
from appliance.engine.engine import Engine
from appliance.engine.lanes import Lanes
from appliance.head.text import Tokenizer
from helpers import ARTICLE, CODE, derive_vocab_model

N_CTX = 1024



def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = {
    "repeat": chat(f"Repeat this text exactly, word for word:\n\n{ARTICLE}"),
    "code": chat(f"Rename the function to compute_total and keep everything else:\n\n{CODE}"),
    "extract": chat(f"From this text, list the mayor's name, the street and the month:\n\n{ARTICLE}"),
    "chat": chat("Tell me a story about a fox."),
}


class LocalEngine:
    """The engine with its messages collected instead of sent to a head."""

    def __init__(self, model: Path, **kw: Any) -> None:
        self.sent: list[Any] = []
        self.memo: dict[Any, Any] = {}
        plan = Plan(assignments=(), n_layers=30, n_ctx=N_CTX, strategy="speed", output_node="head")
        # One thread: ggml's threads spin at barriers, and on a busy 2-core machine two of them
        # wait on each other for whole scheduler slices.
        self.engine = Engine(model_path=str(model), plan=plan, n_ctx_seq=N_CTX, max_batch=4, n_threads=1,
                             send=self.sent.append, **kw)
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

    def alone(self, s: ep.Submit) -> tuple[list[int], list[ep.Logprob | None], Any]:
        """`run(s)[s.id]`, remembered (the engine that never drafts answers several tests)."""
        key = (s.tokens, s.max_new, s.sampling, s.replay)
        if key not in self.memo:
            self.memo[key] = self.run(s)[s.id]
        return self.memo[key]


@pytest.fixture(scope="module")
def tok(demo_model: Path) -> Tokenizer:
    return Tokenizer(str(demo_model))


@pytest.fixture(scope="module")
def plain(demo_model: Path) -> LocalEngine:
    return LocalEngine(demo_model, draft_max=0)


@pytest.fixture(scope="module")
def prompt_drafts(demo_model: Path) -> LocalEngine:
    return LocalEngine(demo_model, draft_max=6, draft_min=4)


@pytest.fixture(scope="module")
def model_drafts(demo_model: Path, tiny_model: Path) -> LocalEngine:
    return LocalEngine(demo_model, draft_max=4, draft_min=3, draft_model_path=str(tiny_model))


def submit(tok: Tokenizer, rid: str, which: str, max_new: int, sampling: ep.Sampling,
           replay: tuple[int, ...] = ()) -> ep.Submit:
    return ep.Submit(id=rid, tokens=tuple(tok.encode(PROMPTS[which])), max_new=max_new, sampling=sampling,
                     replay=replay)


def json_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


ALL = ("repeat", "code", "extract")
SETTINGS = [
    pytest.param(ep.Sampling(), ALL, id="greedy"),
    pytest.param(ep.Sampling(temperature=0.8, seed=11, top_p=0.95), ALL, id="seeded-temperature"),
    pytest.param(ep.Sampling(logprobs=3), ("extract",), id="greedy-logprobs"),
    pytest.param(ep.Sampling(temperature=1.0, seed=12, frequency_penalty=0.5, repeat_penalty=1.1, top_k=40),
                 ("code",), id="seeded-penalties"),
    pytest.param(ep.Sampling(grammar=json_grammar(), presence_penalty=0.3), ("extract",), id="greedy-grammar"),
]


@pytest.mark.parametrize("drafts", ["prompt_drafts", "model_drafts"])
@pytest.mark.parametrize(("sampling", "prompts"), SETTINGS)
def test_drafts_change_no_token(request: pytest.FixtureRequest, plain: LocalEngine, tok: Tokenizer, drafts: str,
                                sampling: ep.Sampling, prompts: tuple[str, ...]) -> None:
    spec: LocalEngine = request.getfixturevalue(drafts)
    n = 64
    for which in prompts:
        want = plain.alone(submit(tok, which, which, n, sampling))
        got = spec.run(submit(tok, which, which, n, sampling))[which]
        assert got[0] == want[0], which
        assert got[1] == want[1], which  # logprobs too (None when not asked for)
        assert type(got[2]) is type(want[2])
    done = got[2]
    assert isinstance(done, ep.Done) and done.drafted > 0, "no draft was checked: nothing was tested"


@pytest.mark.parametrize("drafts", ["prompt_drafts", "model_drafts"])
def test_batched_with_and_without_drafts_each_gets_what_it_gets_alone(
    request: pytest.FixtureRequest, plain: LocalEngine, tok: Tokenizer, drafts: str
) -> None:
    spec: LocalEngine = request.getfixturevalue(drafts)
    reqs = [
        submit(tok, "repeat", "repeat", 80, ep.Sampling()),
        submit(tok, "code", "code", 64, ep.Sampling(temperature=0.7, seed=5)),
        ep.Submit(id="chat", tokens=tuple(tok.encode(PROMPTS["chat"])), max_new=48, sampling=ep.Sampling(),
                  speculative=False),
        submit(tok, "extract", "extract", 40, ep.Sampling(logprobs=2)),
    ]
    alone = {r.id: plain.alone(r)[:2] for r in reqs}
    together = spec.run(*reqs)
    assert {rid: v[:2] for rid, v in together.items()} == alone
    done = {rid: v[2] for rid, v in together.items()}
    assert done["chat"].drafted == 0  # it asked not to speculate; its positions were padding
    assert done["repeat"].drafted > 0 and done["repeat"].accepted > 0


@pytest.mark.parametrize("drafts", ["prompt_drafts", "model_drafts"])
def test_a_resumed_request_with_drafts_continues_exactly(
    request: pytest.FixtureRequest, plain: LocalEngine, tok: Tokenizer, drafts: str
) -> None:
    spec: LocalEngine = request.getfixturevalue(drafts)
    for sampling in (ep.Sampling(), ep.Sampling(temperature=0.9, seed=21)):
        full = plain.alone(submit(tok, "a", "repeat", 90, sampling))[0]
        cut = 37
        rest = spec.run(submit(tok, "b", "repeat", 90 - cut, sampling, replay=tuple(full[:cut])))["b"]
        assert rest[0] == full[cut:]


def test_the_counters_move(prompt_drafts: LocalEngine, tok: Tokenizer) -> None:
    eng = prompt_drafts.engine
    before = (eng.drafted, eng.accepted)
    done = prompt_drafts.run(submit(tok, "r", "repeat", 64, ep.Sampling()))["r"][2]
    assert eng.drafted - before[0] == done.drafted > 0
    assert eng.accepted - before[1] == done.accepted > 0
    assert done.accepted <= done.drafted
    assert eng.speculation == "prompt"


def test_lanes_draft_in_their_own_contexts_and_write_what_each_request_gets_alone(
    demo_model: Path, tiny_model: Path, plain: LocalEngine, tok: Tokenizer
) -> None:
    """Two lanes (appliance.engine.lanes: a thread each) over one loaded model and one set of
    draft weights, each lane with its own draft-model context: concurrent requests write
    their plain text, and the lanes' draft counters add up in the heartbeat's stats."""
    plan = Plan(assignments=(), n_layers=30, n_ctx=N_CTX, strategy="speed", output_node="head")
    engines: list[Engine] = []
    for _ in range(2):
        first = engines[0] if engines else None
        eng = Engine(model_path=str(demo_model), plan=plan, n_ctx_seq=N_CTX, max_batch=2, n_threads=1,
                     send=lambda m: None, draft_max=4, draft_min=3, draft_model_path=str(tiny_model),
                     model=first.model if first else None, draft_weights=first.draft_weights if first else None)
        eng.load()
        engines.append(eng)
    a, b = (e.draft_model for e in engines)
    assert a is not None and b is not None and a is not b and a.ctx != b.ctx
    assert a.weights is b.weights and engines[0].model is engines[1].model  # loaded once
    reqs = [submit(tok, "repeat", "repeat", 48, ep.Sampling()), submit(tok, "code", "code", 48, ep.Sampling()),
            submit(tok, "extract", "extract", 32, ep.Sampling(temperature=0.7, seed=3)),
            submit(tok, "chat", "chat", 32, ep.Sampling())]
    want = {r.id: plain.alone(r)[0] for r in reqs}
    lanes = Lanes(engines)
    lanes.start()
    got: dict[str, list[int]] = {r.id: [] for r in reqs}
    done: dict[str, ep.Done] = {}
    try:
        for r in reqs:
            lanes.submit(r)  # two per lane: the lanes step at once, each drafting in its own context
        deadline = time.monotonic() + 300
        while len(done) < len(reqs) and time.monotonic() < deadline:
            for m in lanes.drain():
                assert not isinstance(m, (ep.Failed, ep.Error)), m
                if isinstance(m, ep.Tokens):
                    for it in m.items:
                        got[it.rid].append(it.token)
                elif isinstance(m, ep.Done):
                    done[m.id] = m
                    lanes.finished(m.id)
            time.sleep(0.01)
    finally:
        lanes.stop()
        for lane in lanes.lanes:
            assert lane.thread is not None
            lane.thread.join(timeout=30)
    assert got == want
    assert all(e.drafted > 0 for e in engines), "a lane checked no draft: nothing was tested"
    stats = lanes.stats()
    assert stats["drafted"] == sum(d.drafted for d in done.values()) == sum(e.drafted for e in engines)
    assert stats["accepted"] == sum(d.accepted for d in done.values()) > 0


def test_a_draft_model_with_another_vocabulary_is_refused(demo_model: Path, tiny_model: Path, tmp_path: Path) -> None:
    other = derive_vocab_model(tiny_model, tmp_path / "other-vocab.gguf", n_vocab=32000)
    with pytest.raises(DraftModelError, match="cannot draft for this model: its vocabulary has 32000 tokens"):
        LocalEngine(demo_model, draft_model_path=str(other))


# ------------------------------------------------------------ the parts
def test_prompt_lookup_continues_the_latest_match_longest_first() -> None:
    text = [1, 2, 3, 4, 9, 9, 5, 2, 3, 4, 7, 8, 2, 3]
    d = NgramDrafts(text)
    assert d.draft(3) == [4, 7, 8]  # (2, 3) last seen before "4 7 8"
    d.append(4)
    assert d.draft(2) == [7, 8]  # (2, 3, 4): the latest occurrence wins
    d.append(1)
    assert d.draft(4) == []  # (4, 1) was never seen, and single tokens are not looked up
    loop = NgramDrafts([5, 6, 5, 6, 5])
    assert loop.draft(5) == [6, 5, 6, 5, 6]  # a run into the end repeats the loop it found
    assert NgramDrafts([1, 2, 3]).draft(4) == []


def test_acceptance_follows_the_drafts() -> None:
    a = Acceptance()
    assert 0.2 < a.rate < 0.5
    for _ in range(10):
        a.record(drafted=4, accepted=4)
    assert a.rate > 0.9
    for _ in range(20):
        a.record(drafted=4, accepted=0)
    assert a.rate < 0.1


def test_the_pass_cost_is_measured_with_a_prior_until_sizes_vary() -> None:
    c = PassCost(prior_marginal=0.3)
    for _ in range(20):
        c.observe(1, 0.100)
    assert c.seconds(1) == pytest.approx(0.100, rel=0.02)
    assert c.seconds(2) / c.seconds(1) == pytest.approx(1.3, rel=0.05)  # only the prior knows the slope
    for i in range(60):
        c.observe(1 + i % 5, 0.100 + 0.010 * (i % 5))  # a pass costs 0.1 s + 0.01 s per extra token
    assert c.seconds(5) - c.seconds(1) == pytest.approx(0.040, rel=0.1)


def test_the_draft_length_drops_to_zero_when_drafts_keep_failing() -> None:
    cheap = PassCost(prior_marginal=0.05)  # memory- or network-bound: one more token costs 5 % of a pass
    for _ in range(5):
        cheap.observe(1, 0.1)
    a = Acceptance()
    for _ in range(5):
        a.record(drafted=6, accepted=6)
    assert choose_length(rates=[a.rate], avail=[8], k_max=8, cost=cheap) >= 6
    for _ in range(12):
        a.record(drafted=6, accepted=0)
    assert 0.1 < a.rate < 0.4
    assert choose_length(rates=[a.rate], avail=[8], k_max=8, cost=cheap) in (1, 2)  # still worth a token or two
    for _ in range(20):
        a.record(drafted=1, accepted=0)
    assert choose_length(rates=[a.rate], avail=[8], k_max=8, cost=cheap) == 0
    # Compute-bound passes (a token costs almost a pass) need nearly certain drafts.
    dear = PassCost(prior_marginal=0.9)
    dear.observe(1, 0.1)
    assert choose_length(rates=[0.6], avail=[8], k_max=8, cost=dear) == 0
    # A draft model's own passes count against it.
    assert choose_length(rates=[0.7], avail=[8], k_max=8, cost=cheap, draft_pass_s=0.5) == 0
    # Nothing to draft: no draft length.
    assert choose_length(rates=[0.99], avail=[0], k_max=8, cost=cheap) == 0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_a_draft_model_s_pass_cost_is_not_its_prompt_catch_up(model_drafts: LocalEngine, tok: Tokenizer) -> None:
    """The draft model reads a new request's whole prompt in its first drafting step; that
    prefill is not what a drafting pass costs. Timing it (found in the LAN benchmark: a
    perfect draft model never drafted, 0/0, because a pass seemed to take a prefill's time)
    kept the adaptive length at zero. The recorded pass cost must be a few-token pass's."""
    from appliance.engine.drafting import DraftModel, SpecState

    model = model_drafts.engine.draft_model
    assert isinstance(model, DraftModel)
    prompt = tok.encode(PROMPTS["repeat"])
    assert len(prompt) > 60
    spec = SpecState.new(prompt)
    slot = 3  # a slot no running request holds (the fixture's engine is idle between tests)
    model.forget(slot)
    model.passes, model.pass_s = 0, 0.0
    t0 = time.perf_counter()
    model.draft([(slot, spec)], 3)  # catch-up over the whole prompt, then two more guesses
    took = time.perf_counter() - t0
    model.forget(slot)
    assert model.passes == 2, model.passes  # the guesses' passes are timed, the prefill is not
    assert model.pass_s < took / 4, (model.pass_s, took)
