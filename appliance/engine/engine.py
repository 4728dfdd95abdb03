"""The engine: the model split over RPC workers, one llama.cpp context, continuous batching.

It runs in the engine process (appliance.engine.process), a separate OS process from
the head on purpose: when an RPC worker dies mid-computation, ggml aborts the whole
process that holds the model ("Remote RPC server crashed or returned malformed
response", SIGABRT). The head loses only this process, re-plans and starts a new one;
its requests survive there.

The engine speaks tokens only: the head tokenizes, applies chat templates, detects stop
strings and detokenizes. A request is `tokens` to prefill and `max_new` tokens to
sample; the engine answers with sampled token ids. That makes resumption after a crash
simple: the head re-submits prompt + tokens already sent, and decoding continues.

Continuous batching: each request gets its own sequence (its own KV cache stream, so
its output is exactly what it would be alone) and its own sampler chain
(appliance.engine.sampling: bias, grammar, penalties, truncation, temperature, seed);
new requests are prefilled between decode steps, and every step decodes one token for
all active sequences in a single `llama_decode` call. Log-probabilities are computed
(numpy, over the step's logits) only for the requests that asked for them.

Speculative decoding (appliance.engine.drafting): a step may also carry drafted tokens for
every sequence that speculates (guessed by prompt lookup or a small local draft model), in
the same `llama_decode`; `_verify` samples each position with the request's own chain and
keeps the drafts up to the first one that differs from the sampled token, then removes the
rest of the draft from the sequence's KV cache. The text is what one token per step writes.
With lanes (appliance.engine.lanes) every lane is an `Engine` and speculates on its own:
its own pass-cost fit, acceptance estimates and draft-model context (over draft weights
loaded once per process); the process adds up the lanes' draft counters.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from time import perf_counter
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from appliance.common import engine_protocol as ep
from appliance.common.dataplane import TunnelSpec
from appliance.core.planner import Plan
from appliance.engine.batch import fill_batch
from appliance.engine.drafting import (
    DRAFT_MAX_TOKENS,
    DRAFT_PROBE_EVIDENCE_TOKENS,
    DRAFT_PROBE_STEPS,
    DraftModel,
    DraftWeights,
    PassCost,
    SpecState,
    choose_length,
    local_offload_devices,
)
from appliance.engine.sampling import SamplerChain, SamplingError

N_BATCH = 512


@dataclass(frozen=True)
class LoadedModel:
    """The weights, placed over the plan's workers; one or several contexts use them."""

    ll: Any
    model: Any
    vocab: Any
    n_vocab: int
    local_gpus: tuple[int, ...] = ()  # this process's own GPUs (for a draft model), when asked for


def load_model(
    *, model_path: str, plan: Plan, send: Callable[[ep.Message], None], tunnels: TunnelSpec | None = None,
    find_local_gpus: bool = False,
) -> LoadedModel:
    """Register the plan's RPC servers (through the TLS relays when `tunnels` names them) and load
    the weights onto them, reporting progress. `find_local_gpus`: first note this process's own
    GPUs (a draft model's place), before the RPC servers' devices join ggml's list."""
    import llama_cpp
    from llama_cpp import _logger as llama_logger

    from appliance.common import ggml  # imports llama_cpp: only the engine process needs it

    llama_logger.set_verbose(os.environ.get("ANYWAY_LLAMA_VERBOSE") == "1")
    llama_cpp.llama_backend_init()
    ll = llama_cpp
    local_gpus = tuple(local_offload_devices()) if find_local_gpus else ()
    endpoints = plan.rpc_endpoints
    if endpoints and tunnels is not None:
        from appliance.common.dataplane import open_tunnels

        endpoints = open_tunnels(tunnels, endpoints)  # TLS relays to the workers (docs/SECURITY.md)
    if endpoints:
        ggml.register_rpc_servers(endpoints)
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = plan.n_gpu_layers
    split = plan.tensor_split
    split_arr = (ctypes.c_float * ll.LLAMA_MAX_DEVICES)(*(split + [0.0] * (ll.LLAMA_MAX_DEVICES - len(split))))
    mparams.tensor_split = split_arr
    last = [-1.0]

    def on_progress(fraction: float, _user: Any) -> bool:
        if fraction - last[0] >= 0.02 or fraction >= 1.0:
            last[0] = fraction
            send(ep.Progress(fraction=round(float(fraction), 4)))
        return True

    progress_cb = ll.llama_progress_callback(on_progress)
    mparams.progress_callback = progress_cb
    model = ll.llama_model_load_from_file(model_path.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path} with plan over {endpoints}")
    vocab = ll.llama_model_get_vocab(model)
    return LoadedModel(ll=ll, model=model, vocab=vocab, n_vocab=int(ll.llama_vocab_n_tokens(vocab)),
                       local_gpus=local_gpus)


@dataclass
class Sequence:
    rid: str
    prompt: tuple[int, ...]
    max_new: int
    sampling: ep.Sampling
    slot: int = -1
    n_past: int = 0
    produced: int = 0
    last: int = -1
    sampler: SamplerChain | None = None
    replay: tuple[int, ...] = ()  # tokens already sent before a restart
    started_at: float = field(default_factory=time.monotonic)
    speculative: bool = True  # the request allows drafts (the engine may still have none)
    spec: SpecState | None = None  # its drafting state, while it runs and speculates
    at: int = 0  # batch index of its `last` token in this step's pass
    drafted: int = 0  # drafted tokens checked for it, and of those accepted
    accepted: int = 0
    expect: int = -1  # the drafted token at the position being sampled (-1: none)


class Engine:
    """Model + context + scheduler. Only `run()` touches the socket."""

    def __init__(
        self,
        *,
        model_path: str,
        plan: Plan,
        n_ctx_seq: int,
        max_batch: int,
        n_threads: int,
        send: Callable[[ep.Message], None],
        model: "LoadedModel | None" = None,
        tunnels: TunnelSpec | None = None,
        draft_max: int = DRAFT_MAX_TOKENS,
        draft_model_path: str = "",
        draft_min: int = 0,
        draft_weights: "DraftWeights | None" = None,
    ) -> None:
        """`model`: weights already loaded (shared by several engines, appliance.engine.lanes);
        `draft_weights` likewise for the draft model (each engine still makes its own draft context)."""
        self.model_path = model_path
        self.tunnels = tunnels
        self.draft_max = max(0, draft_max)  # 0: never speculate
        self.draft_min = min(max(0, draft_min), self.draft_max)  # k at least this whenever there are drafts
        self.draft_model_path = draft_model_path
        self.draft_weights = draft_weights
        self.draft_model: DraftModel | None = None  # this engine's own draft context (never shared)
        self.cost = PassCost()  # what a decode step costs for the tokens in it (measured)
        self.plan = plan
        self.n_ctx_seq = n_ctx_seq
        self.max_batch = max(1, max_batch)
        self.n_threads = n_threads
        self.send = send
        self.model = model
        self.queue: deque[Sequence] = deque()
        self.active: dict[str, Sequence] = {}
        self.free_slots = list(range(self.max_batch))
        self.steps = 0  # decode steps (one llama_decode over every running sequence)
        self.tokens_out = 0
        self.prefilled = 0  # tokens brought in by prefills (prompts, and resumed answers)
        self.decodes = 0  # llama_decode calls, prefill chunks included
        self.on_decode: Callable[[], None] | None = None  # called after each llama_decode (process.py heartbeats)
        self.drafted = 0  # drafted tokens checked by the model
        self.accepted = 0  # of those, accepted (each one a token that needed no pass of its own)

    # ---------------------------------------------------------------- load
    def load(self) -> None:
        """Load the model over the plan's workers (or take the one given), then make a context
        (and, with a draft model, this engine's own draft context)."""
        speculate = bool(self.draft_model_path and self.draft_max)
        if self.model is None:
            self.model = load_model(model_path=self.model_path, plan=self.plan, send=self.send, tunnels=self.tunnels,
                                    find_local_gpus=speculate)
        m = self.model
        ll = m.ll
        self.vocab, self.n_vocab = m.vocab, m.n_vocab
        if speculate and self.draft_weights is None:
            # Loaded once per process; engines (lanes) given the first one's share it.
            self.draft_weights = DraftWeights.load(ll=ll, path=self.draft_model_path, target_vocab=self.vocab,
                                                   devices=list(m.local_gpus))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_seq * self.max_batch
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = self.max_batch
        cparams.kv_unified = False  # one KV stream per sequence: batching never changes results
        cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cpu = os.cpu_count() or 1
        cparams.n_threads = self.n_threads or max(cpu // 2, 1)
        cparams.n_threads_batch = self.n_threads or cpu
        ctx = ll.llama_init_from_model(m.model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory on a node?)")
        self.ctx = ctx
        self.mem = ll.llama_get_memory(ctx)
        self.n_ctx_seq = int(ll.llama_n_ctx_seq(ctx))
        self.batch = ll.llama_batch_init(max(N_BATCH, self.max_batch), 0, 1)
        self.ll = ll
        if speculate:
            assert self.draft_weights is not None
            self.draft_model = DraftModel(weights=self.draft_weights, n_ctx_seq=self.n_ctx_seq,
                                          max_seqs=self.max_batch, n_threads=cparams.n_threads)

    @property
    def speculation(self) -> str:
        """Where this engine's drafts come from: "model", "prompt" (lookup) or "off"."""
        if not self.draft_max:
            return "off"
        return "model" if self.draft_model is not None else "prompt"

    # ------------------------------------------------------------ requests
    def submit(self, msg: ep.Submit) -> None:
        if not msg.tokens:
            self.send(ep.Error(id=msg.id, error="empty prompt"))
            return
        if len(msg.tokens) >= self.n_ctx_seq:
            self.send(ep.Error(id=msg.id, error=f"prompt has {len(msg.tokens)} tokens, context holds {self.n_ctx_seq}"))
            return
        if len(msg.tokens) + len(msg.replay) >= self.n_ctx_seq:
            self.send(ep.Error(id=msg.id, error="prompt and replay exceed the context"))
            return
        if (
            any(t >= self.n_vocab for t in msg.tokens)
            or any(t >= self.n_vocab for t in msg.replay)
            or any(t >= self.n_vocab for t, _ in msg.sampling.logit_bias)
        ):
            self.send(ep.Error(id=msg.id, error=f"token ids must be below the vocabulary size {self.n_vocab}"))
            return
        self.queue.append(
            Sequence(rid=msg.id, prompt=msg.tokens, max_new=msg.max_new, sampling=msg.sampling, replay=msg.replay,
                     speculative=msg.speculative)
        )

    def cancel(self, rid: str) -> None:
        for q in list(self.queue):
            if q.rid == rid:
                self.queue.remove(q)
        seq = self.active.pop(rid, None)
        if seq is not None:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.ll.llama_memory_seq_rm(self.mem, seq.slot, -1, -1)
            if seq.spec is not None and self.draft_model is not None:
                self.draft_model.forget(seq.slot)
            self.free_slots.append(seq.slot)
            seq.slot = -1
        seq.spec = None
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None

    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        fill_batch(self.batch, items)

    def _decode(self) -> None:
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        self.decodes += 1  # counted once done: the head's stall detector sees each pass complete
        if self.on_decode is not None:
            self.on_decode()  # a long prefill is many passes in one step: let the owner heartbeat

    def _finish(self, seq: Sequence, reason: str, out: list[ep.Done]) -> None:
        self.active.pop(seq.rid, None)
        self._release(seq)
        out.append(ep.Done(id=seq.rid, reason=reason, produced=seq.produced, drafted=seq.drafted,
                           accepted=seq.accepted))

    def _logprob(self, idx: int, tok: int, k: int) -> ep.Logprob:
        """The model's log-probability of `tok` at batch index `idx`, and its `k` most likely tokens."""
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))
        x = logits.astype(np.float64)
        m = x.max()
        lse = m + math.log(float(np.exp(x - m).sum()))
        top: tuple[tuple[int, float], ...] = ()
        if k:
            ids = np.argpartition(-x, k - 1)[:k]
            ids = ids[np.argsort(-x[ids], kind="stable")]
            top = tuple((int(i), min(0.0, float(x[i] - lse))) for i in ids)
        return ep.Logprob(logprob=min(0.0, float(x[tok] - lse)), top=top)

    def _sample(self, seq: Sequence, idx: int, emitted: list[ep.Sampled], done: list[ep.Done]) -> int:
        """Sample `seq`'s next token at batch index `idx` and emit it; -1 when the request ended
        with an error (its grammar reached a dead end)."""
        assert seq.sampler is not None
        try:
            tok = seq.sampler.sample(self.ctx, idx)
        except SamplingError as exc:
            self.active.pop(seq.rid, None)
            self._release(seq)
            self.send(ep.Error(id=seq.rid, error=str(exc)))
            return -1
        k = seq.sampling.logprobs
        self._accept(seq, tok, emitted, done, None if k is None else self._logprob(idx, tok, k))
        return tok

    def _accept(
        self, seq: Sequence, tok: int, emitted: list[ep.Sampled], done: list[ep.Done], logprob: ep.Logprob | None
    ) -> None:
        if self.ll.llama_vocab_is_eog(self.vocab, tok):
            self._finish(seq, "stop", done)
            return
        seq.produced += 1
        seq.last = tok
        if seq.spec is not None:
            seq.spec.ngram.append(tok)
            if tok == seq.expect:
                seq.accepted += 1
        emitted.append(ep.Sampled(seq.rid, tok, logprob))
        if seq.produced >= seq.max_new:
            self._finish(seq, "length", done)
        elif seq.n_past + 1 > self.n_ctx_seq:
            self._finish(seq, "context", done)

    def _prefill(self, seq: Sequence, emitted: list[ep.Sampled], done: list[ep.Done]) -> None:
        """Bring a new request into the batch: one batched pass (in N_BATCH chunks) over its
        prompt and, when it resumes after an engine restart, the tokens already sent; then
        sample its next token.

        A resumed request costs one prefill, not a decode step per token already sent: a
        stream that dies 1,000 tokens into an answer does not stall while they are replayed.
        It continues exactly as it would have on the CPU backend built without llamafile's
        sgemm (scripts/bootstrap.sh): ggml computes each position of a batch with the same
        kernels, in the same order, as a decode step (docs/RECOVERY.md has the measurement).
        The request's sampler chain is restored first (penalties, grammar and the RNG are
        where they were when the engine was lost).
        """
        try:
            seq.sampler = SamplerChain(
                ll=self.ll, vocab=self.vocab, n_vocab=self.n_vocab, sampling=seq.sampling,
                max_new=seq.max_new + len(seq.replay),
            )
            seq.sampler.restore(seq.replay)
        except SamplingError as exc:
            self._release(seq)
            self.send(ep.Error(id=seq.rid, error=str(exc)))
            return
        # The lowest free slot: llama.cpp splits a batch into one pass per run of consecutive
        # sequence ids (non-unified KV), so the slots in use are kept together.
        seq.slot = min(self.free_slots)
        self.free_slots.remove(seq.slot)
        self.active[seq.rid] = seq
        toks = seq.prompt + seq.replay
        if seq.speculative and self.draft_max:
            seq.spec = SpecState.new(toks)
        for start in range(0, len(toks), N_BATCH):
            chunk = toks[start : start + N_BATCH]
            last_chunk = start + N_BATCH >= len(toks)
            self._fill(
                [(t, start + i, seq.slot, last_chunk and i == len(chunk) - 1) for i, t in enumerate(chunk)]
            )
            self._decode()
        self.prefilled += len(toks)
        seq.n_past = len(toks)
        self._sample(seq, self.batch.n_tokens - 1, emitted, done)

    def step(self) -> bool:
        """One scheduling round: admit waiting requests, then one pass that decodes a token for
        every running sequence and checks this step's drafted tokens."""
        emitted: list[ep.Sampled] = []
        done: list[ep.Done] = []
        while self.queue and self.free_slots:
            self._prefill(self.queue.popleft(), emitted, done)
        # In slot order: consecutive sequence ids share one pass through the workers.
        running = sorted((s for s in self.active.values() if s.slot >= 0), key=lambda s: s.slot)
        if running:
            k = self._plan_drafts(running) if self.draft_max else 0
            items: list[tuple[int, int, int, bool]] = []
            for s in running:
                s.at = len(items)
                items.append((s.last, s.n_past, s.slot, True))
                if k:
                    drafts = s.spec.drafts if s.spec is not None else ()
                    for j in range(k):
                        # Every sequence gets k positions (one pass); padding is computed, never read.
                        real = j < len(drafts)
                        items.append((drafts[j] if real else s.last, s.n_past + 1 + j, s.slot, real))
            self._fill(items)
            t0 = perf_counter()
            self._decode()
            self.cost.observe(len(items), perf_counter() - t0)
            for s in running:
                self._verify(s, k, emitted, done)
            self.steps += 1
        if emitted:
            self.tokens_out += len(emitted)
            self.send(ep.Tokens(items=tuple(emitted)))
        for d in done:
            self.send(d)
        return bool(emitted or done or running)

    def _plan_drafts(self, running: list[Sequence]) -> int:
        """This step's draft length (the same for every sequence) and each speculating
        sequence's drafted tokens (`spec.drafts`). 0: a plain decode step."""
        model = self.draft_model
        k_cap = min(
            self.draft_max,
            N_BATCH // len(running) - 1,
            min(self.n_ctx_seq - 1 - s.n_past for s in running),
        )
        rates: list[float] = []
        avail: list[int] = []
        for s in running:
            spec = s.spec
            if spec is None:
                rates.append(0.0)
                avail.append(0)
                continue
            useful = min(k_cap, s.max_new - s.produced - 1)
            if model is None:
                spec.drafts = spec.ngram.draft(useful) if useful > 0 else []
                avail.append(len(spec.drafts))
            else:
                spec.drafts = []
                avail.append(max(useful, 0))
            rates.append(spec.acceptance.rate)
        k = 0
        if k_cap > 0 and self.cost.known:
            k = choose_length(rates=rates, avail=avail, k_max=k_cap, cost=self.cost,
                              draft_pass_s=model.pass_s if model is not None else 0.0)
        if self.draft_min and k_cap > 0 and any(avail):
            k = max(k, min(self.draft_min, k_cap))
        if k == 0:
            self._shadow(running, avail)
            return 0
        drafting = [(s, min(k, a)) for s, a in zip(running, avail) if s.spec is not None and a > 0]
        if model is not None:
            guesses = model.draft([(s.slot, s.spec) for s, _ in drafting], max(n for _, n in drafting))
            for (s, n), g in zip(drafting, guesses):
                s.spec.drafts = g[:n]  # type: ignore[union-attr]
                s.spec.idle_steps = 0  # type: ignore[union-attr]
        else:
            for s, n in drafting:
                del s.spec.drafts[n:]  # type: ignore[union-attr]
        return k

    def _shadow(self, running: list[Sequence], avail: list[int]) -> None:
        """No drafts this step: remember an unchecked guess of each sequence's next token, so
        its acceptance estimate keeps up with the text (and drafting can resume). Prompt lookup
        guesses for free; the draft model every DRAFT_PROBE_STEPS steps (every step until it has
        checked DRAFT_PROBE_EVIDENCE_TOKENS tokens of the sequence)."""
        model = self.draft_model
        due: list[Sequence] = []
        for s, a in zip(running, avail):
            spec = s.spec
            if spec is None:
                continue
            if model is None:
                spec.shadow = spec.drafts[0] if spec.drafts else -1
                spec.drafts = []
            elif a > 0:
                spec.idle_steps += 1
                if spec.idle_steps >= DRAFT_PROBE_STEPS or spec.acceptance.checked < DRAFT_PROBE_EVIDENCE_TOKENS:
                    due.append(s)
        if due and model is not None:
            for s, g in zip(due, model.draft([(s.slot, s.spec) for s in due], 1)):  # type: ignore[misc]
                s.spec.shadow = g[0]  # type: ignore[union-attr]
                s.spec.idle_steps = 0  # type: ignore[union-attr]

    def _verify(self, seq: Sequence, k: int, emitted: list[ep.Sampled], done: list[ep.Done]) -> None:
        """Sample `seq`'s positions of this step's pass in order, one token each as a plain step
        would, while the drafted token there was the one sampled; drop the rest of its draft."""
        spec = seq.spec
        drafts = spec.drafts if spec is not None and k else []
        n = len(drafts)
        base = seq.n_past
        told = len(spec.ngram.toks) if spec is not None else 0
        seq.drafted += n  # before sampling: a Done sent on the way counts this step's drafts
        before = seq.accepted
        for j in range(n + 1):
            seq.n_past = base + 1 + j  # `last` and the j drafts before this position are in its cache
            seq.expect = drafts[j] if j < n else -1  # _accept counts it when the sampled token is this
            tok = self._sample(seq, seq.at + j, emitted, done)
            if j == 0 and spec is not None and spec.shadow >= 0:
                spec.acceptance.record(drafted=1, accepted=int(tok == spec.shadow))
                spec.shadow = -1
            if seq.slot < 0 or tok != seq.expect:  # ended (end of text, length, context, error), or a miss
                break
        seq.expect = -1
        accepted = seq.accepted - before
        if n:
            self.drafted += n
            self.accepted += accepted
            if spec is not None:
                spec.acceptance.record(drafted=n, accepted=accepted)
                spec.drafts = []
        if k and seq.slot >= 0:
            # Rejected drafts and padding leave the KV cache: it holds exactly the text so far.
            self.ll.llama_memory_seq_rm(self.mem, seq.slot, seq.n_past, -1)
            if spec is not None and self.draft_model is not None:
                self.draft_model.truncate(seq.slot, spec, told + accepted)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.active)


