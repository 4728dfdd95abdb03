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
its output is exactly what it would be alone); new requests are prefilled between
decode steps, and every step decodes one token for all active sequences in a single
`llama_decode` call.
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from appliance.common import engine_protocol as ep
from appliance.common.dataplane import TunnelSpec
from appliance.core.planner import Plan

N_BATCH = 512


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
    sampler: Any = None
    replay: tuple[int, ...] = ()  # tokens already sent before a restart
    replay_idx: int = 0
    started_at: float = field(default_factory=time.monotonic)


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
        tunnels: TunnelSpec | None = None,
    ) -> None:
        self.model_path = model_path
        self.tunnels = tunnels
        self.plan = plan
        self.n_ctx_seq = n_ctx_seq
        self.max_batch = max(1, max_batch)
        self.n_threads = n_threads
        self.send = send
        self.queue: deque[Sequence] = deque()
        self.active: dict[str, Sequence] = {}
        self.free_slots = list(range(self.max_batch))
        self.steps = 0
        self.tokens_out = 0

    # ---------------------------------------------------------------- load
    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _logger as llama_logger

        from appliance.common import ggml  # imports llama_cpp: only the engine process needs it

        llama_logger.set_verbose(os.environ.get("ANYWAY_LLAMA_VERBOSE") == "1")
        llama_cpp.llama_backend_init()
        ll = llama_cpp
        endpoints = self.plan.rpc_endpoints
        if endpoints and self.tunnels is not None:
            from appliance.common.dataplane import open_tunnels

            endpoints = open_tunnels(self.tunnels, endpoints)  # TLS relays to the workers (docs/SECURITY.md)
        if endpoints:
            ggml.register_rpc_servers(endpoints)

        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = self.plan.n_gpu_layers
        split = self.plan.tensor_split
        self._split = (ctypes.c_float * ll.LLAMA_MAX_DEVICES)(*(split + [0.0] * (ll.LLAMA_MAX_DEVICES - len(split))))
        mparams.tensor_split = self._split
        last = [-1.0]

        def on_progress(fraction: float, _user: Any) -> bool:
            if fraction - last[0] >= 0.02 or fraction >= 1.0:
                last[0] = fraction
                self.send(ep.Progress(fraction=round(float(fraction), 4)))
            return True

        self._progress_cb = ll.llama_progress_callback(on_progress)
        mparams.progress_callback = self._progress_cb
        model = ll.llama_model_load_from_file(self.model_path.encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.model_path} with plan over {endpoints}")
        self.model = model
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))

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
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory on a node?)")
        self.ctx = ctx
        self.mem = ll.llama_get_memory(ctx)
        self.n_ctx_seq = int(ll.llama_n_ctx_seq(ctx))
        self.batch = ll.llama_batch_init(max(N_BATCH, self.max_batch), 0, 1)
        self.ll = ll

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
        if any(t >= self.n_vocab for t in msg.tokens) or any(t >= self.n_vocab for t in msg.replay):
            self.send(ep.Error(id=msg.id, error=f"token ids must be below the vocabulary size {self.n_vocab}"))
            return
        self.queue.append(
            Sequence(rid=msg.id, prompt=msg.tokens, max_new=msg.max_new, sampling=msg.sampling, replay=msg.replay)
        )

    def cancel(self, rid: str) -> None:
        for q in list(self.queue):
            if q.rid == rid:
                self.queue.remove(q)
        seq = self.active.pop(rid, None)
        if seq is not None:
            self._release(seq)

    def _make_sampler(self, s: ep.Sampling) -> Any:
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if s.temperature <= 0.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if s.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else random.getrandbits(32)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(int(seed) & 0xFFFFFFFF))
        return chain

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.ll.llama_memory_seq_rm(self.mem, seq.slot, -1, -1)
            self.free_slots.append(seq.slot)
            seq.slot = -1
        if seq.sampler is not None:
            self.ll.llama_sampler_free(seq.sampler)
            seq.sampler = None

    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq_id, want) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = 1 if want else 0

    def _decode(self) -> None:
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _finish(self, seq: Sequence, reason: str, out: list[ep.Done]) -> None:
        self.active.pop(seq.rid, None)
        self._release(seq)
        out.append(ep.Done(id=seq.rid, reason=reason, produced=seq.produced))

    def _accept(self, seq: Sequence, tok: int, emitted: list[tuple[str, int]], done: list[ep.Done]) -> None:
        if self.ll.llama_vocab_is_eog(self.vocab, tok):
            self._finish(seq, "stop", done)
            return
        seq.produced += 1
        seq.last = tok
        emitted.append((seq.rid, tok))
        if seq.produced >= seq.max_new:
            self._finish(seq, "length", done)
        elif seq.n_past + 1 > self.n_ctx_seq:
            self._finish(seq, "context", done)

    def _prefill(self, seq: Sequence, emitted: list[tuple[str, int]], done: list[ep.Done]) -> None:
        seq.slot = self.free_slots.pop(0)
        seq.sampler = self._make_sampler(seq.sampling)
        self.active[seq.rid] = seq
        toks = seq.prompt
        for start in range(0, len(toks), N_BATCH):
            chunk = toks[start : start + N_BATCH]
            last_chunk = start + N_BATCH >= len(toks)
            self._fill(
                [(t, start + i, seq.slot, last_chunk and i == len(chunk) - 1) for i, t in enumerate(chunk)]
            )
            self._decode()
        seq.n_past = len(toks)
        if seq.replay:
            # Resuming after an engine restart: re-decode the tokens already sent one per
            # step, exactly as they were first computed (a prefill over them gives
            # slightly different floats, and greedy output could drift).
            seq.last = seq.replay[0]
            seq.replay_idx = 1
            return
        tok = self.ll.llama_sampler_sample(seq.sampler, self.ctx, self.batch.n_tokens - 1)
        self._accept(seq, int(tok), emitted, done)

    def step(self) -> bool:
        """One scheduling round: admit waiting requests, decode one token for all."""
        emitted: list[tuple[str, int]] = []
        done: list[ep.Done] = []
        while self.queue and self.free_slots:
            self._prefill(self.queue.popleft(), emitted, done)
        running = [s for s in self.active.values() if s.slot >= 0]
        if running:
            self._fill([(s.last, s.n_past, s.slot, True) for s in running])
            self._decode()
            for i, s in enumerate(running):
                s.n_past += 1
                if s.replay_idx < len(s.replay):
                    s.last = s.replay[s.replay_idx]
                    s.replay_idx += 1
                    continue
                tok = self.ll.llama_sampler_sample(s.sampler, self.ctx, i)
                self._accept(s, int(tok), emitted, done)
            self.steps += 1
        if emitted:
            self.tokens_out += len(emitted)
            self.send(ep.Tokens(items=tuple(emitted)))
        for d in done:
            self.send(d)
        return bool(emitted or done or running)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.active)


