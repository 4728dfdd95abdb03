"""Requests survive the engine: routing tokens to requests, and resuming them on a new engine.

Each in-flight request keeps its prompt tokens and the tokens already streamed. When
the engine is lost (it crashed, was killed because a worker died or hung, or was
restarted for a re-plan), every request on it waits for the next engine and is
re-submitted with `replay` = tokens already sent; the engine brings them into its KV
cache and its sampler chain (penalties, grammar, random generator) and goes on, so the
client sees one uninterrupted stream (identical to a fault-free run with greedy decoding,
and with a seed at any temperature: appliance.engine.sampling).

`RequestRouter.generate()` is the one entry point the API uses; `EngineProcess` feeds
it the engine's messages through the `RequestSink` methods.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import zmq

from appliance.common import engine_protocol as ep
from appliance.common import logs
from appliance.common.kinds import EngineState
from appliance.head.engine_process import EngineProcess

log = logs.get("head.requests")


class Ticket:
    """A request's place in the engine's batch or its queue; `release()` gives it back (once)."""

    def __init__(self, admission: "Admission", n: int) -> None:
        self._admission, self._n = admission, n

    def release(self) -> None:
        if self._n:
            self._admission.in_flight -= self._n
            self._n = 0


class Admission:
    """Bounded abuse: at most `limit` sequences run or wait; past it, new requests are refused
    (429) instead of queueing without bound. Counted from when a request is accepted (before
    its prompt is tokenized) until its answer is done or its client has gone."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self, n: int = 1) -> Ticket | None:
        if self.in_flight + n > self.limit:
            return None
        self.in_flight += n
        return Ticket(self, n)


class EngineUnavailable(Exception):
    """No engine came back within the recovery timeout (or the cluster is degraded)."""


class EngineRequestError(Exception):
    """The engine rejected the request itself (e.g. it does not fit the context)."""


@dataclass
class GenParams:
    """One generation: what to run, and (filled in by `generate`) how it ended."""

    prompt: list[int]
    max_new: int
    sampling: ep.Sampling = field(default_factory=ep.Sampling)
    speculative: bool = True  # the engine may check drafted tokens for it (same text, other speed)
    finish_reason: str = ""  # "stop" | "length", set when the engine finishes it
    resumes: int = 0  # how many engine restarts it survived
    drafted: int = 0  # drafted tokens checked for it, by the engine that finished it
    accepted: int = 0  # of those, accepted


# What a request's queue carries: (kind, engine generation, payload).
_Item = tuple[str, int, object]


@dataclass
class _Active:
    rid: str
    params: GenParams
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    sent: list[int] = field(default_factory=list)
    gen: int = 0  # engine generation the request is on (0: not submitted)
    resuming: bool = False  # re-submitted after an engine loss, no token from the new engine yet
    finished: bool = False


class RequestRouter:
    def __init__(
        self,
        *,
        engine: EngineProcess,
        recovery_timeout_s: float,
        on_tokens: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.engine = engine
        self.recovery_timeout_s = recovery_timeout_s
        self.on_tokens = on_tokens
        self.requests: dict[str, _Active] = {}
        self._ids = itertools.count(1)
        engine.sink = self

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    @property
    def resuming(self) -> bool:
        """Some request is being brought back after an engine loss and has not caught up."""
        return any(r.resuming for r in self.requests.values())

    # ------------------------------------------------------ RequestSink
    def on_engine_message(self, gen: int, msg: ep.Tokens | ep.Done | ep.Error) -> None:
        if isinstance(msg, ep.Tokens):
            by_req: dict[str, list[ep.Sampled]] = {}
            for it in msg.items:
                by_req.setdefault(it.rid, []).append(it)
            for rid, toks in by_req.items():
                r = self.requests.get(rid)
                if r is not None and r.gen == gen:
                    r.resuming = False
                    r.queue.put_nowait(("tokens", gen, toks))
            self.on_tokens(len(msg.items))
            return
        r = self.requests.get(msg.id)
        if r is None or r.gen != gen:
            return
        r.resuming = False
        if isinstance(msg, ep.Done):
            r.params.drafted += msg.drafted
            r.params.accepted += msg.accepted
            r.queue.put_nowait(("done", gen, msg.reason))
        else:
            r.queue.put_nowait(("error", gen, msg.error))

    def on_engine_lost(self, gen: int, reason: str) -> None:
        for r in self.requests.values():
            if r.gen == gen:
                r.queue.put_nowait(("lost", gen, reason))

    # ------------------------------------------------------------ requests
    async def generate(self, params: GenParams, *, degraded: Callable[[], str]) -> AsyncIterator[ep.Sampled]:
        """Yields sampled tokens (with their logprobs when asked for); survives engine
        restarts. Sets `params.finish_reason`."""
        rid = f"r{next(self._ids)}"
        req = _Active(rid=rid, params=params)
        self.requests[rid] = req
        engine = self.engine
        try:
            while True:
                if engine.state != EngineState.SERVING:
                    await self._wait_serving(degraded)
                remaining = params.max_new - len(req.sent)
                if remaining <= 0:
                    params.finish_reason = "length"
                    req.finished = True
                    return
                req.gen = engine.gen
                req.resuming = params.resumes > 0
                await engine.send(
                    ep.Submit(
                        id=rid, tokens=tuple(params.prompt), replay=tuple(req.sent), max_new=remaining,
                        sampling=params.sampling, speculative=params.speculative,
                    )
                )
                while True:
                    kind, gen, payload = await req.queue.get()
                    if gen != req.gen:
                        continue
                    if kind == "tokens":
                        for it in payload:  # type: ignore[attr-defined]
                            req.sent.append(it.token)
                            yield it
                    elif kind == "done":
                        params.finish_reason = "length" if payload in ("length", "context") else "stop"
                        req.finished = True
                        return
                    elif kind == "error":
                        req.finished = True
                        raise EngineRequestError(str(payload))
                    elif kind == "lost":
                        params.resumes += 1
                        log.info("request_interrupted", rid=rid, sent=len(req.sent), reason=payload)
                        break
        finally:
            self.requests.pop(rid, None)
            if not req.finished and req.gen == engine.gen and engine.state == EngineState.SERVING:
                try:
                    await engine.send(ep.Cancel(id=rid))
                except zmq.ZMQError:
                    pass

    async def _wait_serving(self, degraded: Callable[[], str]) -> None:
        engine = self.engine
        deadline = time.monotonic() + self.recovery_timeout_s
        while engine.state != EngineState.SERVING:
            left = deadline - time.monotonic()
            if left <= 0:
                why = degraded() or f"engine is {engine.state.value}"
                raise EngineUnavailable(f"no engine within {self.recovery_timeout_s:.0f}s: {why}")
            try:
                await asyncio.wait_for(engine.serving.wait(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                pass
