"""Speculative decoding's drafts: where guesses of the next tokens come from, and how many to check.

Why this exists: a model split over RPC workers decodes one token per pass through every
worker, and a pass costs every worker's compute plus a round trip to each. One pass can
check several guessed tokens of a sequence at once (they go into the same `llama_decode`
as the other sequences' tokens); where a pass costs about the same for k+1 tokens as for
one (memory- or network-bound decoding), every guess that turns out right is nearly free.

The guesses never change the text. The engine (`Engine._verify`) samples every position
with the request's own sampler chain, exactly as it would one token at a time (ggml's CPU
backend computes a batch's positions bit-identically to single steps), and keeps a drafted
token only when it equals the token sampled there; the first sampled token that differs is
emitted instead, and the rest of the draft is dropped with its KV entries. For a drafted
token d, that is the standard speculative-sampling acceptance rule with a one-hot draft
distribution (accept with probability p(d), else sample from p without d, renormalised),
so the output distribution at any temperature is unchanged; with a seed, and greedily, the
output is the same token for token, because every emitted token costs the sampler exactly
the draw it costs without speculation.

Where drafts come from:

* `NgramDrafts` (prompt lookup, no extra model): the latest earlier occurrence in the
  prompt or the text so far of the last 4, 3 or 2 tokens, and what followed it. Summaries,
  rewrites, extractions and code edits copy long runs of their input.
* `DraftModel`: a small model with the same vocabulary, on the head's own CPU or GPU
  (`--draft-model`), run greedily for k steps, all drafting sequences in one batch per step.
  Its weights (`DraftWeights`) are loaded once per engine process; each engine, so each lane
  (appliance.engine.lanes), has its own `DraftModel` context over them, stepped only by that
  lane's thread: no draft context is shared between threads.

How many (`DraftControl`): each sequence keeps an estimate of how often its drafts are
accepted (`Acceptance`, also fed by "shadow" drafts that are made but not checked while
its draft length is zero, so it can come back), and the engine measures what a decode pass
costs for the number of tokens in it (`PassCost`). Each step picks the one draft length
for all sequences (one `llama_decode` splits into one pass per distinct sequence length
with non-unified KV, so every sequence gets the same count; sequences with shorter drafts
are padded with tokens that are computed but never read) that maximises expected tokens
per second, and no draft at all unless that beats plain decoding by a margin. Drafts that
keep failing therefore drop the length to zero and plain decoding costs nothing extra.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from appliance.engine.batch import fill_batch

from appliance.common.config import DEFAULT_DRAFT_MAX_TOKENS as DRAFT_MAX_TOKENS  # noqa: F401 - re-exported

NGRAM_SIZES = (4, 3, 2)
"""Prompt lookup matches the last 4, then 3, then 2 tokens (longest first)."""
ACCEPTANCE_PRIOR_HITS = 1.0
ACCEPTANCE_PRIOR_TRIALS = 3.0
"""A new sequence's acceptance estimate: 1 in 3, worth 3 observed tokens."""
ACCEPTANCE_DECAY = 0.85
"""Each checked token (drafted or shadow) weighs the earlier evidence down by this factor
(about the last 7 tokens count): about 14 misses in a row take a perfect record below 10 %."""
PASS_COST_DECAY = 0.97
"""Decode-pass timings are averaged with this forgetting factor per step (about 30 steps)."""
PASS_COST_PRIOR_MARGINAL = 0.3
"""Before the timings tell, one more token in a pass is assumed to cost this fraction of a
one-token pass; the prior weighs as much as one observed step."""
SPECULATION_MARGIN = 0.03
"""Drafts are checked only when the expected tokens/s beats plain decoding by this fraction."""
DRAFT_PROBE_STEPS = 16
"""A sequence whose draft model drafts are off has it guess one token (unchecked) this often ..."""
DRAFT_PROBE_EVIDENCE_TOKENS = 6
"""... and at every step while its acceptance estimate rests on fewer checked tokens than this
(a new request learns within a few steps whether the draft model guesses its text)."""


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one verification pass emits, on average, for `k` drafted tokens accepted each with
    probability `rate` until the first miss: the accepted run plus the token sampled after it."""
    if k <= 0:
        return 1.0
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


class Acceptance:
    """How often one sequence's drafted tokens are accepted: decayed counts with a prior."""

    __slots__ = ("hits", "trials", "checked")

    def __init__(self) -> None:
        self.hits = ACCEPTANCE_PRIOR_HITS
        self.trials = ACCEPTANCE_PRIOR_TRIALS
        self.checked = 0  # tokens checked so far (drafted or shadow)

    def record(self, *, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` tokens were accepted (a run: the first miss ends it)."""
        if drafted <= 0:
            return
        trials = accepted + (1 if accepted < drafted else 0)
        self.checked += trials
        keep = ACCEPTANCE_DECAY**trials
        self.hits = self.hits * keep + accepted
        self.trials = self.trials * keep + trials

    @property
    def rate(self) -> float:
        return self.hits / self.trials


class PassCost:
    """Seconds one decode pass takes for n tokens, t(n) = a + b*n, fitted over recent steps.

    Weighted least squares with exponential forgetting, regularised towards the prior (one
    more token in a pass costs `prior_marginal` of a one-token pass: b = prior * (a + b)) with
    the weight of one step: while every step had the same size (one sequence, no drafts yet)
    the slope cannot be measured and the prior decides; once sizes vary, the timings do.
    """

    def __init__(self, *, prior_marginal: float = PASS_COST_PRIOR_MARGINAL, decay: float = PASS_COST_DECAY) -> None:
        assert 0.0 <= prior_marginal < 1.0
        self.prior, self.decay = prior_marginal, decay
        self.w = self.sn = self.st = self.snn = self.snt = 0.0
        self._fit: tuple[float, float] | None = None

    def observe(self, n: int, seconds: float) -> None:
        d = self.decay
        self.w = self.w * d + 1.0
        self.sn = self.sn * d + n
        self.st = self.st * d + seconds
        self.snn = self.snn * d + n * n
        self.snt = self.snt * d + n * seconds
        self._fit = None

    @property
    def known(self) -> bool:
        return self.w > 0.0

    def fit(self) -> tuple[float, float]:
        """(a, b): seconds per pass and per token in it."""
        if self._fit is None:
            c = self.prior / (1.0 - self.prior)  # b = c * a
            m11, m12 = self.w + c * c, self.sn - c
            m22 = self.snn + 1.0
            det = m11 * m22 - m12 * m12
            if det <= 1e-12:
                a, b = (self.st / self.w if self.w else 1.0), 0.0
            else:
                a = (self.st * m22 - m12 * self.snt) / det
                b = (m11 * self.snt - m12 * self.st) / det
            mean_t = self.st / self.w if self.w else 1.0
            a = max(a, 0.02 * mean_t)  # noisy fits must not claim passes are free
            self._fit = (a, max(b, 0.0))
        return self._fit

    def seconds(self, n: int) -> float:
        a, b = self.fit()
        return a + b * n


def choose_length(
    *, rates: Sequence[float], avail: Sequence[int], k_max: int, cost: PassCost, draft_pass_s: float = 0.0
) -> int:
    """The draft length for this step (the same for every running sequence): the one that
    maximises expected emitted tokens per second, 0 unless that beats plain decoding by
    SPECULATION_MARGIN. `rates[i]` is sequence i's acceptance estimate (0: it does not
    speculate), `avail[i]` how many drafted tokens it can have at most, `draft_pass_s` what
    one drafting pass costs (a draft model's decode; 0 for prompt lookup)."""
    n_seqs = len(rates)
    if n_seqs == 0 or k_max <= 0 or not any(avail):
        return 0
    plain = n_seqs / cost.seconds(n_seqs)
    best_k, best = 0, plain * (1.0 + SPECULATION_MARGIN)
    for k in range(1, k_max + 1):
        gain = 0.0
        for r, a in zip(rates, avail):
            gain += expected_tokens(r, min(k, a))
        speed = gain / (cost.seconds(n_seqs * (k + 1)) + k * draft_pass_s)
        if speed > best:
            best_k, best = k, speed
    return best_k


class NgramDrafts:
    """Prompt lookup over one sequence's tokens (its prompt, then everything it generated).

    For each n in NGRAM_SIZES a dict maps every n-gram seen so far (except the current
    suffix) to where its latest occurrence was followed; a draft continues from there. A
    continuation that runs into the end of the text repeats the loop it found. Appending a
    token costs a few dict writes; no search over the text.
    """

    __slots__ = ("toks", "maps")

    def __init__(self, tokens: Sequence[int]) -> None:
        self.toks = list(tokens)
        self.maps: list[dict[tuple[int, ...], int]] = [{} for _ in NGRAM_SIZES]
        for end in range(len(self.toks) - 1):
            self._index(end)

    def _index(self, end: int) -> None:
        toks = self.toks
        for m, n in zip(self.maps, NGRAM_SIZES):
            if end + 1 >= n:
                m[tuple(toks[end - n + 1 : end + 1])] = end + 1

    def append(self, tok: int) -> None:
        self.toks.append(tok)
        self._index(len(self.toks) - 2)

    def draft(self, k: int) -> list[int]:
        toks = self.toks
        size = len(toks)
        for m, n in zip(self.maps, NGRAM_SIZES):
            if size < n:
                continue
            p = m.get(tuple(toks[size - n :]))
            if p is not None:
                period = size - p
                return [toks[p + j % period] for j in range(k)] if k > period else toks[p : p + k]
        return []


@dataclass
class SpecState:
    """A sequence's speculation: its tokens (for the drafters), acceptance, draft model state."""

    ngram: NgramDrafts
    acceptance: Acceptance
    drafts: list[int]  # this step's drafted tokens (checked in this step's pass)
    shadow: int = -1  # an unchecked guess of the next token (-1: none), to keep `acceptance` current
    d_past: int = 0  # tokens of this sequence in the draft model's KV cache (a prefix of ngram.toks)
    idle_steps: int = 0  # steps since the draft model last guessed for it

    @classmethod
    def new(cls, tokens: Sequence[int]) -> "SpecState":
        return cls(ngram=NgramDrafts(tokens), acceptance=Acceptance(), drafts=[])


class DraftModelError(RuntimeError):
    """The draft model cannot be used with this model (another vocabulary, or it did not load)."""


def local_offload_devices() -> list[int]:
    """The ggml device handles of this process's own GPUs (call before RPC servers are
    registered, so no RPC device is among them)."""
    from appliance.common import ggml

    L = ggml.lib()
    L.ggml_backend_load_all()
    out = []
    for i in range(L.ggml_backend_dev_count()):
        d = L.ggml_backend_dev_get(i)
        if ggml.DEVICE_TYPES.get(L.ggml_backend_dev_type(d)) in ("gpu", "igpu"):
            out.append(int(d))
    return out


class DraftWeights:
    """A draft model's weights, loaded once per engine process and checked against the
    target's vocabulary. Read-only once loaded: every lane (appliance.engine.lanes) makes its
    own `DraftModel` context over them, as the lanes do over the target's `LoadedModel`."""

    def __init__(self, *, ll: Any, path: str, model: Any, vocab: Any, devices: Any) -> None:
        self.ll, self.path, self.model, self.vocab = ll, path, model, vocab
        self.n_vocab = int(ll.llama_vocab_n_tokens(vocab))
        self._devices = devices  # the device list the weights were placed with (kept alive)

    @classmethod
    def load(cls, *, ll: Any, path: str, target_vocab: Any, devices: list[int]) -> "DraftWeights":
        """Load `path` on this process's own `devices` (GPUs; none: the CPU) and refuse it when
        its vocabulary is not the target's."""
        mparams = ll.llama_model_default_params()
        dev_arr = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        mparams.devices = ctypes.addressof(dev_arr)
        mparams.n_gpu_layers = -1 if devices else 0
        model = ll.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise DraftModelError(f"llama.cpp could not load the draft model {path}")
        vocab = ll.llama_model_get_vocab(model)
        why = vocab_difference(ll, target_vocab, vocab)
        if why:
            ll.llama_model_free(model)
            raise DraftModelError(f"the draft model {path} cannot draft for this model: {why}")
        return cls(ll=ll, path=path, model=model, vocab=vocab, devices=dev_arr)

    def close(self) -> None:
        """Free the weights (after every `DraftModel` over them is closed)."""
        self.ll.llama_model_free(self.model)


class DraftModel:
    """A small model with the target's vocabulary, local to the engine (the head's CPU, or its
    GPU when it has one), drafting greedily for every speculating sequence in one batch.

    One per engine: it is a llama.cpp context (KV cache, batch, compute buffers) over shared,
    read-only `DraftWeights`, used only by the thread that steps its engine; with lanes, each
    lane has its own, so lanes never share a draft context (one is not safe across threads).

    Its context has one unified KV cache (any mix of sequence lengths is one pass; drafts need
    no bit-exactness). Each sequence's slot is the target's; `SpecState.d_past` says how much
    of the sequence's text it has seen, and each drafting step first catches up on the rest
    (the whole prompt the first time) in the same batch.
    """

    N_BATCH = 512

    def __init__(self, *, weights: DraftWeights, n_ctx_seq: int, max_seqs: int, n_threads: int) -> None:
        ll = weights.ll
        self.ll = ll
        self.weights = weights
        self.path = weights.path
        self.n_vocab = weights.n_vocab
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * max_seqs
        cparams.n_batch = cparams.n_ubatch = self.N_BATCH
        cparams.n_seq_max = max_seqs
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = n_threads
        ctx = ll.llama_init_from_model(weights.model, cparams)
        if not ctx:
            raise DraftModelError("llama.cpp could not create the draft model's context (out of memory?)")
        self.ctx = ctx
        self.mem = ll.llama_get_memory(ctx)
        self.batch = ll.llama_batch_init(self.N_BATCH, 0, 1)
        self.pass_s = 0.0  # recent seconds per drafting pass (decay-averaged)
        self.passes = 0

    def forget(self, slot: int) -> None:
        self.ll.llama_memory_seq_rm(self.mem, slot, -1, -1)

    def truncate(self, slot: int, spec: SpecState, keep: int) -> None:
        """Keep only the first `keep` tokens of the sequence in the draft model's cache."""
        if spec.d_past > keep:
            self.ll.llama_memory_seq_rm(self.mem, slot, keep, -1)
            spec.d_past = keep

    def _decode(self, items: list[tuple[int, int, int, bool]], *, timed: bool = True) -> None:
        fill_batch(self.batch, items)
        t0 = time.perf_counter()
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise DraftModelError(f"the draft model's llama_decode failed with code {rc}")
        if not timed:
            return
        dt = time.perf_counter() - t0
        self.passes += 1
        self.pass_s = dt if self.passes == 1 else 0.8 * self.pass_s + 0.2 * dt

    def _argmax(self, idx: int) -> int:
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))
        return int(logits.argmax())

    def draft(self, seqs: list[tuple[int, SpecState]], k: int) -> list[list[int]]:
        """`k` greedy guesses for each (slot, state): the draft model first reads what it has
        not seen of each text (one batch, in chunks), then one pass per further guess."""
        out: list[list[int]] = [[] for _ in seqs]
        if k <= 0 or not seqs:
            return out
        # Catch up: every unseen token of every sequence; logits at each one's last token.
        pending: list[tuple[int, int, int, bool]] = []
        owner: list[int] = []
        for i, (slot, spec) in enumerate(seqs):
            toks = spec.ngram.toks
            if spec.d_past >= len(toks):  # it has seen everything: read the last token again
                self.truncate(slot, spec, len(toks) - 1)
            for pos in range(spec.d_past, len(toks)):
                pending.append((toks[pos], pos, slot, pos == len(toks) - 1))
                owner.append(i)
            spec.d_past = len(toks)
        # A catch-up over a whole prompt (or a long unseen stretch) is a prefill, not what a
        # drafting step costs: timing it made pass_s seconds long and drafting never paid.
        small = len(seqs) * (DRAFT_MAX_TOKENS + 1)
        for start in range(0, len(pending), self.N_BATCH):
            chunk = pending[start : start + self.N_BATCH]
            self._decode(chunk, timed=len(chunk) <= small)
            for j, (_, _, _, want) in enumerate(chunk):
                if want:
                    out[owner[start + j]].append(self._argmax(j))
        for _ in range(1, k):
            items = []
            for i, (slot, spec) in enumerate(seqs):
                items.append((out[i][-1], spec.d_past, slot, True))
                spec.d_past += 1
            self._decode(items)
            for i in range(len(seqs)):
                out[i].append(self._argmax(i))
        return out

    def close(self) -> None:
        """Free this context (the weights stay: `DraftWeights.close`)."""
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)


def vocab_difference(ll: Any, a: Any, b: Any) -> str:
    """Why two llama.cpp vocabularies are not the same one ("" when they are): token ids
    mean the same text in both, so a draft's ids can be checked by the target model."""
    na, nb = int(ll.llama_vocab_n_tokens(a)), int(ll.llama_vocab_n_tokens(b))
    if na != nb:
        return f"its vocabulary has {nb} tokens, the model's has {na}"
    if int(ll.llama_vocab_type(a)) != int(ll.llama_vocab_type(b)):
        return "its tokenizer type differs"
    for tok in range(na):
        ta, tb = ll.llama_vocab_get_text(a, tok), ll.llama_vocab_get_text(b, tok)
        if ta != tb:
            return f"token {tok} is {tb!r} in it and {ta!r} in the model"
    return ""
