"""One request's sampler chain: every sampling stage of a request, built, run and restored here.

The engine keeps one `SamplerChain` per sequence, so requests decoded in the same batch never
share sampling state (a penalty window, a grammar's position, a random generator). The chain
is llama.cpp's own (`llama_sampler_chain_*`), in the order llama.cpp's common sampler uses:

    logit_bias → grammar → penalties (repeat, frequency, presence) → top_k → top_p → min_p
    → temperature → dist (seeded)          or, at temperature 0:  ... → greedy

The grammar comes right after the bias, before any truncation, so a truncating stage can
never leave only tokens the grammar forbids. Truncation (top_k, top_p, min_p) works on the
model's own distribution; temperature is applied to what is left (llama.cpp's default).
Penalties count the tokens this request has generated (OpenAI's "the text so far" of the
completion), not the prompt.

Resuming after an engine restart (`restore`): the chain of a resumed request is brought to
the state it had when the last replayed token was sent. Every replayed token is accepted
into the chain (`llama_sampler_accept`: the penalty window and counts, the grammar's parse
state) and the random generator of `dist` is advanced by one draw per replayed token (each
sampled token cost exactly one draw: `dist` draws once per call whatever the candidates).
So, with a seed and the same logits, a resumed request continues with exactly the tokens an
uninterrupted one would have sampled. What is not reproduced: a request without a seed
continues from a fresh random seed (it never had a reproducible stream), and a resume
that recomputes the KV cache with other floats than the first run (e.g. one batched prefill
over the replay instead of one token per step) may flip a draw that falls within float
rounding of a boundary between two tokens; greedy requests are affected only by the floats.

Grammar requests are sampled through `llama_sampler_apply` on the candidates rather than
`llama_sampler_sample`, so that a grammar that allows no next token ends that request with
an error instead of aborting the engine process (llama.cpp aborts when a grammar is made
to accept a token it forbids).
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import Any

import numpy as np

from appliance.common import engine_protocol as ep


class SamplingError(Exception):
    """The request's sampling cannot go on (its grammar is invalid or reached a dead end)."""


class SamplerChain:
    """A request's llama.cpp sampler chain, and the two views into it that resuming needs."""

    def __init__(self, *, ll: Any, vocab: Any, n_vocab: int, sampling: ep.Sampling, max_new: int) -> None:
        self.ll = ll
        self.n_vocab = n_vocab
        self.sampling = s = sampling
        self.chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        self.grammar: Any = None  # the grammar stage, to check a token against it alone
        self.dist: Any = None  # the random stage, to advance its generator on resume
        self._cand: Any = None  # candidates buffer for grammar requests (numpy, llama_token_data layout)
        try:
            self._build(vocab, s, max_new)
        except BaseException:
            self.free()
            raise

    def _add(self, smpl: Any) -> Any:
        if not smpl:
            raise SamplingError("llama.cpp could not create a sampler stage")
        self.ll.llama_sampler_chain_add(self.chain, smpl)
        return smpl

    def _build(self, vocab: Any, s: ep.Sampling, max_new: int) -> None:
        ll = self.ll
        if s.logit_bias:
            arr = (ll.llama_logit_bias * len(s.logit_bias))(*[ll.llama_logit_bias(t, b) for t, b in s.logit_bias])
            self._add(ll.llama_sampler_init_logit_bias(self.n_vocab, len(s.logit_bias), arr))
        if s.grammar:
            g = ll.llama_sampler_init_grammar(vocab, s.grammar.encode(), b"root")
            if not g:
                raise SamplingError("the grammar does not parse")
            self.grammar = self._add(g)
            self._cand = np.zeros(self.n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        if s.presence_penalty or s.frequency_penalty or s.repeat_penalty != 1.0:
            window = max(1, max_new)
            self._add(ll.llama_sampler_init_penalties(
                self.n_vocab, window, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0.0:
            self._add(ll.llama_sampler_init_greedy())
            return
        if s.top_k > 0:
            self._add(ll.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            self._add(ll.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            self._add(ll.llama_sampler_init_min_p(s.min_p, 1))
        self._add(ll.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else random.getrandbits(32)
        self.dist = self._add(ll.llama_sampler_init_dist(int(seed) & 0xFFFFFFFF))

    # ------------------------------------------------------------ sampling
    def sample(self, ctx: Any, idx: int) -> int:
        """Sample the next token from the logits at batch index `idx` and accept it."""
        if self.grammar is None:
            return int(self.ll.llama_sampler_sample(self.chain, ctx, idx))
        ll = self.ll
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        arr = ll.llama_token_data_array(
            data=cand.ctypes.data_as(ll.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False
        )
        ll.llama_sampler_apply(self.chain, ctypes.byref(arr))
        sel = int(arr.selected)
        # Samplers may re-point `data` (to a sorted copy): read the choice through it.
        if not 0 <= sel < int(arr.size) or not math.isfinite(arr.data[sel].logit):
            raise SamplingError("the grammar allows no next token")
        tok = int(arr.data[sel].id)
        ll.llama_sampler_accept(self.chain, tok)
        return tok

    def allows(self, tok: int) -> bool:
        """Whether the grammar (if any) allows `tok` next."""
        if self.grammar is None:
            return True
        one = (self.ll.llama_token_data * 1)(self.ll.llama_token_data(tok, 0.0, 0.0))
        arr = self.ll.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        self.ll.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return math.isfinite(one[0].logit)

    def restore(self, replay: tuple[int, ...]) -> None:
        """Bring the chain to its state after sampling `replay` (a resumed request)."""
        ll = self.ll
        for tok in replay:
            if not self.allows(tok):
                raise SamplingError(f"replayed token {tok} does not match the request's grammar")
            ll.llama_sampler_accept(self.chain, tok)
        if self.dist is not None and replay:
            # One draw per sampled token: dist draws once per call, even for one candidate.
            one = (ll.llama_token_data * 1)()
            arr = ll.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
            for _ in replay:
                one[0] = ll.llama_token_data(0, 0.0, 0.0)
                arr.size, arr.selected = 1, -1
                ll.llama_sampler_apply(self.dist, ctypes.byref(arr))

    def free(self) -> None:
        if self.chain is not None:
            self.ll.llama_sampler_free(self.chain)  # frees every stage in it
            self.chain = None
