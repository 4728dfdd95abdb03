"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions.

Requests are validated once into the models below (a bad field is a 400 naming it),
turned into tokens (the model's own chat template for chat, with the request's tools),
and handed to the head's `RequestRouter`, which survives engine restarts. Everything that
decides how a token is picked (sampling settings, a grammar for `response_format` or forced
tool calls, how many logprobs) travels to the engine as one `engine_protocol.Sampling`.

One `Completion` builds every body and streamed chunk for both endpoints; one error
mapping (api.errors) covers streaming and non-streaming alike. Stop strings,
detokenization (never splitting UTF-8), tool-call parsing (head.tools) and the placing of
logprobs run here, on the head, because the engine speaks tokens only. `n` > 1 runs the
choices as separate sequences of the engine's batch, merged into one response.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from appliance.common import engine_protocol as ep
from appliance.common import logs
from appliance.head import tools as tl
from appliance.head.api.deps import get_head
from appliance.head.api.errors import ApiError, from_domain, unavailable
from appliance.head.requests import EngineRequestError, EngineUnavailable, GenParams, Ticket
from appliance.head.structured import SchemaError, json_object_grammar, schema_grammar
from appliance.head.supervisor import Head
from appliance.head.text import ChatTemplate, Detokenizer, StopMatcher, TemplateError, Tokenizer

log = logs.get("head.api")

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_N = 16
MAX_TOOLS = 128
MAX_COMPLETION_LOGPROBS = 5
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

router = APIRouter()


# ------------------------------------------------------------------ models
class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Base):
    type: Literal["text"]
    text: str


class FunctionCall(_Base):
    name: str = Field(pattern=NAME_PATTERN)
    arguments: str


class ToolCall(_Base):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _shape(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str | None:
        if self.content is None:
            return None
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Base):
    include_usage: bool = False


class FunctionDef(_Base):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: ChosenFunction


class JsonSchemaSpec(_Base):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with the schema")
        return self


class _GenRequest(_Base):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1_000_000)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    response_format: ResponseFormat | None = None
    user: str | None = None
    speculative: StrictBool | None = None
    """Not OpenAI's: check drafted tokens (speculative decoding; the same text, faster when the
    drafts are right). None: the server's default (`anyway head --speculative`)."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_LENGTH} characters")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > ep.MAX_LOGIT_BIAS:
            raise ValueError(f"at most {ep.MAX_LOGIT_BIAS} tokens may be biased")
        for k, b in v.items():
            if not k.isdigit() or len(k) > 9:
                raise ValueError(f"keys must be token ids, not {k[:20]!r}")
            if not math.isfinite(b) or not -100 <= b <= 100:
                raise ValueError("biases must be between -100 and 100")
        return v

    def sampling(self, *, choice: int, grammar: str, logprobs: int | None) -> ep.Sampling:
        seed = None if self.seed is None else (self.seed + choice) & 0xFFFFFFFF
        return ep.Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repeat_penalty=self.repeat_penalty,
            logit_bias=tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items())),
            seed=seed,
            grammar=grammar,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_GenRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=ep.MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_GenRequest):
    prompt: str | list[str] | list[int] = Field()
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    best_of: int = Field(default=1, ge=1, le=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)


# --------------------------------------------------------------- bodies
@dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    """A sampled token's logprob and where its text starts in the completion."""

    token: int
    offset: int
    logprob: ep.Logprob


@dataclass
class Completion:
    """Every body of one completion, streamed or not, for either endpoint."""

    chat: bool
    model: str
    tokenizer: Tokenizer | None = None
    keep: frozenset[int] = frozenset()
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def _envelope(self, *, stream: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---------------------------------------------------------- logprobs
    def _token(self, tok: int) -> tuple[str, list[int]]:
        assert self.tokenizer is not None
        raw = self.tokenizer.piece(tok, special=tok in self.keep)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """`logprobs` of a choice (chat) or a choice's text (completions) for `entries`."""
        if entries is None:
            return None
        if self.chat:
            content = []
            for e in entries:
                text, raw = self._token(e.token)
                top = []
                for t, lp in e.logprob.top:
                    tt, tb = self._token(t)
                    top.append({"token": tt, "logprob": lp, "bytes": tb})
                content.append({"token": text, "logprob": e.logprob.logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content, "refusal": None}
        texts = [self._token(e.token)[0] for e in entries]
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob.logprob for e in entries],
            "top_logprobs": [{self._token(t)[0]: lp for t, lp in e.logprob.top} for e in entries],
            "text_offset": [e.offset for e in entries],
        }

    # ------------------------------------------------------------ chunks
    def chunk(
        self, index: int, *, delta: dict[str, Any] | None = None, finish: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        lp = self.logprobs(logprobs)
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": index, "text": (delta or {}).get("content", ""), "logprobs": lp, "finish_reason": finish}
        return {**self._envelope(stream=True), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope(stream=True), "choices": [], "usage": usage}

    def choice(
        self, index: int, *, text: str | None, calls: list[tl.ParsedCall], finish: str,
        logprobs: list[TokenLogprob] | None,
    ) -> dict[str, Any]:
        lp = self.logprobs(logprobs)
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish}

    def final(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope(stream=False), "choices": choices, "usage": usage}


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _deltas(events: list[tl.Event]) -> list[dict[str, Any]]:
    """OpenAI's chat deltas for parser events: content, a call's start, its arguments."""
    out: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, tl.Content):
            out.append({"content": e.text})
        elif isinstance(e, tl.CallStart):
            out.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                        "function": {"name": e.name, "arguments": ""}}]})
        else:
            out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return out


# ----------------------------------------------------------- generation
@dataclass
class _Piece:
    text: str
    logprobs: list[TokenLogprob]


class _Run:
    """One choice's text stream: tokens from the router, detokenized, stop strings applied.

    Logprobs stay with the text: a token's entry goes out with the piece that carries the
    first character of its text, and a token whose text starts at or after a stop string
    is not reported (the client never sees its text either).
    """

    def __init__(self, head: Head, params: GenParams, stops: list[str], *, keep: frozenset[int] = frozenset()) -> None:
        self.head, self.params, self.stops, self.keep = head, params, stops, keep
        self.count = 0
        self.finish = ""
        self.t0 = time.monotonic()

    async def pieces(self) -> AsyncIterator[_Piece]:
        head = self.head
        detok = Detokenizer(head.tokenizer, keep=self.keep)
        matcher = StopMatcher(self.stops)
        made = 0  # characters of text the tokens made so far
        sent = 0  # characters of it let out (made minus what the stop matcher holds)
        pending: deque[TokenLogprob] = deque()

        def due(limit: int | None) -> list[TokenLogprob]:
            out = []
            while pending and (limit is None or pending[0].offset < limit):
                out.append(pending.popleft())
            return out

        gen = head.router.generate(self.params, degraded=head.degraded_reason)
        try:
            async for s in gen:
                if self.count == 0:
                    head.metrics.ttft.observe(time.monotonic() - self.t0)
                self.count += 1
                head.metrics.tokens.inc()
                text = detok.push(s.token)
                if s.logprob is not None:
                    pending.append(TokenLogprob(token=s.token, offset=made, logprob=s.logprob))
                made += len(text)
                out = matcher.push(text)
                sent += len(out)
                if matcher.hit:
                    self.finish = "stop"
                    yield _Piece(out, due(sent))
                    return
                if out or pending:
                    lps = due(sent)
                    if out or lps:
                        yield _Piece(out, lps)
            tail = matcher.push(detok.flush())
            if matcher.hit:
                self.finish = "stop"
            else:
                tail += matcher.flush()
            sent += len(tail)
            lps = due(sent) if matcher.hit else due(None)
            if tail or lps:
                yield _Piece(tail, lps)
            self.finish = self.finish or self.params.finish_reason or "length"
        finally:
            await gen.aclose()
            if self.params.resumes:
                head.metrics.resumed.inc(self.params.resumes)


@dataclass(frozen=True, kw_only=True)
class _Output:
    """What a request wants back besides text: logprobs, tool calls."""

    logprobs: bool
    tools: tl.ToolPlan | None = None
    keep: frozenset[int] = frozenset()


class _Choice:
    """One choice of a response: its run, its tool parser, what it has produced."""

    def __init__(self, head: Head, *, index: int, params: GenParams, stops: list[str], out: _Output) -> None:
        self.index = index
        self.run = _Run(head, params, stops, keep=out.keep)
        plan = out.tools
        self.named = bool(plan and plan.named)
        self.parser = tl.ToolParser(plan.format, max_calls=plan.max_calls) if plan and plan.parse else None
        self.want_logprobs = out.logprobs
        self.text = ""
        self.logprobs: list[TokenLogprob] = []

    async def deltas(self) -> AsyncIterator[tuple[dict[str, Any] | None, list[TokenLogprob]]]:
        """(delta, logprobs) pairs: chat deltas (content / tool calls); None carries only logprobs."""
        async for piece in self.run.pieces():
            self.logprobs += piece.logprobs
            if self.parser is None:
                self.text += piece.text
                yield ({"content": piece.text} if piece.text else None), piece.logprobs
                continue
            ds = _deltas(self.parser.feed(piece.text))
            if not ds:
                if piece.logprobs:
                    yield None, piece.logprobs
                continue
            for i, d in enumerate(ds):
                yield d, piece.logprobs if i == 0 else []
        if self.parser is not None:
            for d in _deltas(self.parser.finish()):
                yield d, []

    @property
    def finish(self) -> str:
        reason = self.run.finish or "length"
        if self.parser is not None and self.parser.calls and reason != "length":
            return "stop" if self.named else "tool_calls"
        return reason

    def result(self, body: Completion) -> dict[str, Any]:
        if self.parser is None:
            text: str | None = self.text
            calls: list[tl.ParsedCall] = []
        else:
            calls = self.parser.calls
            text = self.parser.content if (self.parser.content.strip() or not calls) else None
        return body.choice(self.index, text=text, calls=calls, finish=self.finish,
                           logprobs=self.logprobs if self.want_logprobs else None)


async def _merge(gens: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The items of several async iterators as they come (the choices of n > 1)."""
    if len(gens) == 1:
        async for x in gens[0]:
            yield x
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()
    finished = object()

    async def pump(g: AsyncIterator[Any]) -> None:
        try:
            async for x in g:
                await queue.put(x)
            await queue.put(finished)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        left = len(tasks)
        while left:
            x = await queue.get()
            if x is finished:
                left -= 1
            elif isinstance(x, Exception):
                raise x
            else:
                yield x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _respond(
    head: Head, *, prompt_len: int, choices: list[_Choice], body: Completion, stream: bool, include_usage: bool,
    request: Request, ticket: Ticket,
) -> Response:
    """Run the choices and answer; `ticket` (the request's place in line) is given back when
    the answer is done, the client leaves, or it fails."""
    try:
        response = await _answer(head, prompt_len=prompt_len, choices=choices, body=body, stream=stream,
                                 include_usage=include_usage, request=request, ticket=ticket)
    except BaseException:
        ticket.release()
        raise
    if not stream:
        ticket.release()
    return response


async def _answer(
    head: Head, *, prompt_len: int, choices: list[_Choice], body: Completion, stream: bool, include_usage: bool,
    request: Request, ticket: Ticket,
) -> Response:
    head.metrics.prompt_tokens.inc(prompt_len)
    retry = head.timing.recovery.RETRY_AFTER_S

    def usage() -> dict[str, Any]:
        made = sum(c.run.count for c in choices)
        out: dict[str, Any] = {"prompt_tokens": prompt_len, "completion_tokens": made, "total_tokens": prompt_len + made}
        drafted = sum(c.run.params.drafted for c in choices)
        if drafted:  # OpenAI's fields for predicted outputs: drafted tokens right and wrong
            accepted = sum(c.run.params.accepted for c in choices)
            out["completion_tokens_details"] = {
                "accepted_prediction_tokens": accepted, "rejected_prediction_tokens": drafted - accepted,
            }
        return out

    if not stream:

        async def drain(c: _Choice) -> None:
            async for _ in c.deltas():
                pass

        # The client may leave before the answer is complete: then stop decoding for it at once.
        work = asyncio.ensure_future(asyncio.gather(*(drain(c) for c in choices)))
        gone = asyncio.ensure_future(_until_disconnected(request))
        left = False
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            left = not work.done()
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # the generators' cleanup cancels the sequences in the engine
                await asyncio.gather(work, return_exceptions=True)
        if left:
            head.metrics.abandoned.inc()
            return Response(status_code=499)  # nobody reads it
        try:
            work.result()
        except (EngineUnavailable, EngineRequestError) as exc:
            raise from_domain(exc, retry_after_s=retry) from None
        return JSONResponse(body.final([c.result(body) for c in choices], usage()))

    async def chunks(c: _Choice) -> AsyncIterator[dict[str, Any]]:
        carried: list[TokenLogprob] = []
        async for delta, lps in c.deltas():
            carried += lps
            if delta is None:
                continue
            yield body.chunk(c.index, delta=delta, logprobs=carried if c.want_logprobs else None)
            carried = []
        yield body.chunk(c.index, finish=c.finish, logprobs=carried if c.want_logprobs and carried else None)

    merged = _merge([chunks(c) for c in choices])
    # Streaming: wait for the first chunk before committing to a 200, so that an error
    # that comes at once (the engine rejects the request) is a proper HTTP error.
    try:
        first: dict[str, Any] | None = await merged.__anext__()
    except StopAsyncIteration:
        first = None
    except (EngineUnavailable, EngineRequestError) as exc:
        await merged.aclose()
        raise from_domain(exc, retry_after_s=retry) from None

    async def events() -> AsyncIterator[bytes]:
        for c in choices:
            role = {"role": "assistant", "content": None if c.parser is not None else ""}
            yield _sse(body.chunk(c.index, delta=role) if body.chat else body.chunk(c.index))
        try:
            if first is not None:
                yield _sse(first)
            async for ch in merged:
                yield _sse(ch)
            if include_usage:
                yield _sse(body.usage_chunk(usage()))
        except (EngineUnavailable, EngineRequestError) as exc:
            yield _sse(from_domain(exc, retry_after_s=retry).body())
        finally:
            await merged.aclose()
            ticket.release()
        yield _sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(ticket.release),  # also when the stream never started
    )


# ------------------------------------------------------------ checks
def _surrogate(obj: Any, path: str = "") -> str | None:
    """The path of the first string holding a lone surrogate (JSON's "\\ud800"), if any: such
    text cannot be encoded, tokenized or echoed back."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _surrogate(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def _check_text(req: _GenRequest) -> None:
    where = _surrogate(req.model_dump())
    if where:
        raise ApiError(400, f"Invalid value for '{where}': not valid Unicode (a lone surrogate)", param=where,
                       code="invalid_value")


def _admit(head: Head, n: int) -> Ticket:
    """A place in the engine's batch or its queue for `n` sequences, or 429 when both are full."""
    ticket = head.admission.enter(n)
    if ticket is None:
        raise ApiError(
            429,
            f"Too many requests: {head.admission.limit} are running or waiting; retry shortly",
            type_="rate_limit_error",
            code="too_many_requests",
            headers={"Retry-After": str(head.timing.recovery.RETRY_AFTER_S)},
        )
    return ticket


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: `receive` now waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_model(head: Head, model: str) -> None:
    if model != head.model_id:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this cluster serves '{head.model_id}'",
            param="model",
            code="model_not_found",
        )


def _check_available(head: Head) -> None:
    why = head.degraded_reason()
    if why:
        raise unavailable(
            f"The cluster is degraded and cannot serve the model right now: {why}",
            retry_after_s=head.timing.recovery.RETRY_AFTER_S,
        )


def _budget(head: Head, prompt_len: int, max_tokens: int | None, param: str) -> int:
    n_ctx = head.engine.n_ctx_served
    if prompt_len >= n_ctx:
        raise ApiError(
            400,
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has {prompt_len} tokens.",
            param=param,
            code="context_length_exceeded",
        )
    limit = head.cfg.max_tokens
    if limit and max_tokens is not None and max_tokens > limit:
        raise ApiError(
            400, f"max_tokens is {max_tokens}, above this server's per-request limit of {limit}",
            param=param, code="invalid_value",
        )
    if max_tokens is None:
        return min(n_ctx - prompt_len, limit) if limit else n_ctx - prompt_len
    if prompt_len + max_tokens > n_ctx:
        raise ApiError(
            400,
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or the completion length.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def _speculative(head: Head, req: _GenRequest) -> bool:
    """Whether the request's tokens may be drafted and checked: its `speculative`, else the server's default."""
    return head.cfg.speculative if req.speculative is None else req.speculative


def _check_bias(head: Head, req: _GenRequest) -> None:
    vocab = head.profile.vocab_size
    for k in req.logit_bias or {}:
        if int(k) >= vocab:
            raise ApiError(400, f"logit_bias: token id {k} is not below the vocabulary size {vocab}",
                           param="logit_bias", code="invalid_value")


def _schema_error(exc: SchemaError, param: str) -> ApiError:
    return ApiError(400, f"Invalid schema for '{param}': {exc}", param=param, code="unsupported_schema")


def _format_grammar(req: _GenRequest) -> str:
    """The grammar for the request's `response_format` ("" for text)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return ""
    if fmt.type == "json_object":
        return json_object_grammar()
    assert fmt.json_schema is not None
    param = "response_format.json_schema.schema"
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
    try:
        return schema_grammar(schema)
    except SchemaError as exc:
        raise _schema_error(exc, param) from None


def _check_grammar(head: Head, grammar: str, *, param: str) -> None:
    if grammar and not head.tokenizer.check_grammar(grammar):
        raise ApiError(400, f"llama.cpp refused the grammar made for '{param}' (too large or too complex)",
                       param=param, code="unsupported_schema")


_caps: "weakref.WeakKeyDictionary[ChatTemplate, tl.TemplateCaps]" = weakref.WeakKeyDictionary()


def template_caps(tok: Tokenizer) -> tl.TemplateCaps:
    """What the model's chat template does with tools (found once per template)."""
    caps = _caps.get(tok.chat)
    if caps is None:
        caps = _caps[tok.chat] = tl.TemplateCaps.detect(tok.chat)
    return caps


def _tool_request(req: ChatRequest) -> tl.ToolRequest | None:
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return None
    names: set[str] = set()
    functions = []
    for i, t in enumerate(req.tools):
        fn = t.function
        if fn.name in names:
            raise ApiError(400, f"two tools are named {fn.name!r}", param=f"tools.{i}.function.name",
                           code="invalid_value")
        names.add(fn.name)
        params = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
        param = f"tools.{i}.function.parameters"
        try:
            tl.check_parameters(params, param=param)
        except SchemaError as exc:
            raise _schema_error(exc, param) from None
        functions.append(tl.Function(name=fn.name, description=fn.description, parameters=params))
    choice = req.tool_choice or "auto"
    name = None
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice.function.name", code="invalid_value")
        choice = "function"
    return tl.ToolRequest(functions=tuple(functions), choice=choice, name=name, parallel=req.parallel_tool_calls)


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen_calls: set[str] = set()
    for i, m in enumerate(req.messages):
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            seen_calls.update(c.id for c in m.tool_calls)
        if m.role == "tool":
            if m.tool_call_id not in seen_calls:
                raise ApiError(400, "a tool message must answer a tool call of an earlier assistant message",
                               param=f"messages.{i}.tool_call_id", code="invalid_value")
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


# ------------------------------------------------------------ routes
@router.get("/v1/models")
async def models(head: Head = Depends(get_head)) -> dict[str, Any]:
    p = head.profile
    caps = template_caps(head.tokenizer)
    n_ctx = head.engine.n_ctx_served
    return {
        "object": "list",
        "data": [
            {
                "id": head.model_id,
                "object": "model",
                "created": int(head.started_at),
                "owned_by": "anyway",
                "context_length": n_ctx,
                "meta": {
                    "architecture": p.architecture,
                    "n_layers": p.n_layers,
                    "n_ctx": n_ctx,
                    "weight_bytes": p.total_weight_bytes,
                    "chat_template": p.has_chat_template,
                    "capabilities": {
                        "tools": caps.tools,
                        "tool_call_format": caps.format.value,
                        "tool_calls_in_history": caps.tool_calls,
                        "tool_messages": caps.tool_responses,
                        "structured_outputs": True,
                        "logprobs": True,
                        "max_top_logprobs": ep.MAX_TOP_LOGPROBS,
                        "max_n": MAX_N,
                    },
                },
            }
        ],
    }


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request, head: Head = Depends(get_head)) -> Response:
    _check_text(req)
    _check_model(head, req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs to be true", param="top_logprobs", code="invalid_value")
    _check_bias(head, req)
    _check_available(head)
    tool_req = _tool_request(req)
    fmt_grammar = _format_grammar(req)
    if fmt_grammar and tool_req is not None and tool_req.choice != "none":
        raise ApiError(400, "response_format cannot be combined with tools unless tool_choice is 'none'",
                       param="response_format", code="invalid_value")
    caps = template_caps(head.tokenizer)
    try:
        plan = tl.plan(_messages(req), req=tool_req, caps=caps)
    except SchemaError as exc:
        raise _schema_error(exc, "tools") from None
    grammar = plan.grammar or fmt_grammar
    _check_grammar(head, grammar, param="tools" if plan.grammar else "response_format")
    ticket = _admit(head, req.n)
    try:
        # Off the event loop (it also serves the control plane): a large prompt takes a while.
        prompt, tokens = await asyncio.get_running_loop().run_in_executor(
            head.text_pool, lambda: head.tokenizer.encode_chat(plan.messages, tools=plan.template_tools)
        )
    except TemplateError as exc:
        ticket.release()
        raise ApiError(400, str(exc), param="messages", code="invalid_messages") from None
    except BaseException:
        ticket.release()
        raise
    max_tokens = req.max_completion_tokens or req.max_tokens
    param = ("max_completion_tokens" if req.max_completion_tokens else "max_tokens") if max_tokens else "messages"
    try:
        budget = _budget(head, len(tokens), max_tokens, param)
    except ApiError:
        ticket.release()
        raise
    keep = frozenset(t for t in (head.tokenizer.special_token(m) for m in plan.preserve) if t is not None)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    out = _Output(logprobs=req.logprobs, tools=plan if plan.parse else None, keep=keep)
    stops = list(req.stop or []) + list(prompt.stop)  # type: ignore[arg-type]
    choices = [
        _Choice(head, index=i, stops=stops, out=out,
                params=GenParams(prompt=tokens, max_new=budget,
                                 sampling=req.sampling(choice=i, grammar=grammar, logprobs=logprobs),
                                 speculative=_speculative(head, req)))
        for i in range(req.n)
    ]
    return await _respond(
        head, prompt_len=len(tokens), choices=choices,
        body=Completion(chat=True, model=head.model_id, tokenizer=head.tokenizer, keep=keep),
        stream=req.stream, include_usage=req.include_usage, request=request, ticket=ticket,
    )


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, head: Head = Depends(get_head)) -> Response:
    _check_text(req)
    _check_model(head, req.model)
    if req.echo:
        raise ApiError(400, "echo is not supported", param="echo", code="unsupported_parameter")
    _check_bias(head, req)
    _check_available(head)
    p = req.prompt
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt", code="invalid_value")
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        # A raw prompt is the client's own template: its special tokens are meant as such.
        text = p
        tokens = await asyncio.get_running_loop().run_in_executor(
            head.text_pool, lambda: head.tokenizer.encode(text, add_bos=True)
        )
    else:
        tokens = [int(t) for t in p]
        if not tokens:
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        if any(t < 0 or t >= head.profile.vocab_size for t in tokens):
            raise ApiError(400, f"token ids must be in [0, {head.profile.vocab_size})", param="prompt", code="invalid_value")
    grammar = _format_grammar(req)
    _check_grammar(head, grammar, param="response_format")
    budget = _budget(head, len(tokens), req.max_tokens, "max_tokens")
    ticket = _admit(head, req.n)
    out = _Output(logprobs=req.logprobs is not None)
    choices = [
        _Choice(head, index=i, stops=list(req.stop or []), out=out,  # type: ignore[arg-type]
                params=GenParams(prompt=tokens, max_new=budget,
                                 sampling=req.sampling(choice=i, grammar=grammar, logprobs=req.logprobs),
                                 speculative=_speculative(head, req)))
        for i in range(req.n)
    ]
    return await _respond(
        head, prompt_len=len(tokens), choices=choices,
        body=Completion(chat=False, model=head.model_id, tokenizer=head.tokenizer),
        stream=req.stream, include_usage=req.include_usage, request=request, ticket=ticket,
    )
