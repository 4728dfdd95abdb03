"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions.

Requests are validated once into the models below (a bad field is a 400 naming it),
turned into tokens (the model's own chat template for chat), and handed to the head's
`RequestRouter`, which survives engine restarts. One `Completion` builds every body
and streamed chunk for both endpoints; one error mapping (api.errors) covers streaming
and non-streaming alike. Stop strings and detokenization (never splitting UTF-8) run
here, on the head, because the engine speaks tokens only.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.common import engine_protocol as ep
from appliance.common import logs
from appliance.head.api.deps import get_head
from appliance.head.api.errors import ApiError, from_domain, unavailable
from appliance.head.requests import EngineRequestError, EngineUnavailable, GenParams
from appliance.head.supervisor import Head
from appliance.head.text import Detokenizer, StopMatcher, TemplateError

log = logs.get("head.api")

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256

router = APIRouter()


# ------------------------------------------------------------------ models
class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Base):
    include_usage: bool = False


class _GenRequest(_Base):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_LENGTH} characters")
        return [s for s in stops if s]

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("penalties are not supported by this server (use 0)")
        return v

    def sampling(self) -> ep.Sampling:
        seed = None if self.seed is None else self.seed & 0xFFFFFFFF
        return ep.Sampling(temperature=self.temperature, top_p=self.top_p, seed=seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_GenRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_GenRequest):
    prompt: str | list[str] | list[int] = Field()
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    best_of: int = Field(default=1, ge=1, le=1)
    logprobs: None = None


# --------------------------------------------------------------- bodies
@dataclass
class Completion:
    """Every body of one completion, streamed or not, for either endpoint."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def _envelope(self, *, stream: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, *, text: str | None, finish: str | None, stream: bool, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not stream:
            message = {"role": "assistant", "content": text or ""}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def chunk(self, *, text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        return {**self._envelope(stream=True), "choices": [self._choice(text=text, finish=finish, stream=True, role=role)]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(stream=True), "choices": [], "usage": usage}

    def final(self, *, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(stream=False), "choices": [self._choice(text=text, finish=finish, stream=False)], "usage": usage}


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# ----------------------------------------------------------- generation
class _Run:
    """One request's text stream: tokens from the router, detokenized, stop strings applied."""

    def __init__(self, head: Head, params: GenParams, stops: list[str]) -> None:
        self.head, self.params, self.stops = head, params, stops
        self.count = 0
        self.finish = ""
        self.t0 = time.monotonic()

    def usage(self) -> dict[str, int]:
        n = len(self.params.prompt)
        return {"prompt_tokens": n, "completion_tokens": self.count, "total_tokens": n + self.count}

    async def texts(self) -> AsyncIterator[str]:
        head = self.head
        detok = Detokenizer(head.tokenizer)
        matcher = StopMatcher(self.stops)
        gen = head.router.generate(self.params, degraded=head.degraded_reason)
        try:
            async for s in gen:
                if self.count == 0:
                    head.metrics.ttft.observe(time.monotonic() - self.t0)
                self.count += 1
                head.metrics.tokens.inc()
                text = matcher.push(detok.push(s.token))
                if text:
                    yield text
                if matcher.hit:
                    self.finish = "stop"
                    return
            tail = matcher.push(detok.flush())
            if matcher.hit:
                self.finish = "stop"
            else:
                tail += matcher.flush()
            if tail:
                yield tail
            self.finish = self.finish or self.params.finish_reason or "length"
        finally:
            await gen.aclose()
            if self.params.resumes:
                head.metrics.resumed.inc(self.params.resumes)


async def _respond(
    head: Head, *, params: GenParams, stops: list[str], body: Completion, stream: bool, include_usage: bool
) -> Response:
    head.metrics.prompt_tokens.inc(len(params.prompt))
    retry = head.timing.recovery.RETRY_AFTER_S
    run = _Run(head, params, stops)
    texts = run.texts()
    if not stream:
        try:
            text = "".join([piece async for piece in texts])
        except (EngineUnavailable, EngineRequestError) as exc:
            raise from_domain(exc, retry_after_s=retry) from None
        return JSONResponse(body.final(text=text, finish=run.finish or "length", usage=run.usage()))

    # Streaming: wait for the first piece before committing to a 200, so that an error
    # that comes at once (the engine rejects the request) is a proper HTTP error.
    try:
        first: str | None = await texts.__anext__()
    except StopAsyncIteration:
        first = None
    except (EngineUnavailable, EngineRequestError) as exc:
        raise from_domain(exc, retry_after_s=retry) from None

    async def events() -> AsyncIterator[bytes]:
        yield _sse(body.chunk(role=True))
        try:
            if first:
                yield _sse(body.chunk(text=first))
            async for piece in texts:
                yield _sse(body.chunk(text=piece))
            yield _sse(body.chunk(finish=run.finish or "length"))
            if include_usage:
                yield _sse(body.usage_chunk(run.usage()))
        except (EngineUnavailable, EngineRequestError) as exc:
            yield _sse(from_domain(exc, retry_after_s=retry).body())
        finally:
            await texts.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# ------------------------------------------------------------ checks
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


# ------------------------------------------------------------ routes
@router.get("/v1/models")
async def models(head: Head = Depends(get_head)) -> dict[str, Any]:
    p = head.profile
    return {
        "object": "list",
        "data": [
            {
                "id": head.model_id,
                "object": "model",
                "created": int(head.started_at),
                "owned_by": "anyway",
                "meta": {
                    "architecture": p.architecture,
                    "n_layers": p.n_layers,
                    "n_ctx": head.engine.n_ctx_served,
                    "weight_bytes": p.total_weight_bytes,
                    "chat_template": p.has_chat_template,
                },
            }
        ],
    }


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, head: Head = Depends(get_head)) -> Response:
    _check_model(head, req.model)
    _check_available(head)
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    try:
        prompt = head.tokenizer.format_chat(messages)
    except TemplateError as exc:
        raise ApiError(400, str(exc), param="messages", code="invalid_messages") from None
    tokens = head.tokenizer.encode(prompt.text, add_bos=prompt.add_bos)
    max_tokens = req.max_completion_tokens or req.max_tokens
    budget = _budget(head, len(tokens), max_tokens, "max_tokens" if max_tokens else "messages")
    params = GenParams(prompt=tokens, max_new=budget, sampling=req.sampling())
    return await _respond(
        head,
        params=params,
        stops=list(req.stop or []) + list(prompt.stop),  # type: ignore[arg-type]
        body=Completion(chat=True, model=head.model_id),
        stream=req.stream,
        include_usage=req.include_usage,
    )


@router.post("/v1/completions")
async def completions(req: CompletionRequest, head: Head = Depends(get_head)) -> Response:
    _check_model(head, req.model)
    if req.echo:
        raise ApiError(400, "echo is not supported", param="echo", code="unsupported_parameter")
    _check_available(head)
    p = req.prompt
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt", code="invalid_value")
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        tokens = head.tokenizer.encode(p, add_bos=True)
    else:
        tokens = [int(t) for t in p]
        if not tokens:
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        if any(t < 0 or t >= head.profile.vocab_size for t in tokens):
            raise ApiError(400, f"token ids must be in [0, {head.profile.vocab_size})", param="prompt", code="invalid_value")
    budget = _budget(head, len(tokens), req.max_tokens, "max_tokens")
    params = GenParams(prompt=tokens, max_new=budget, sampling=req.sampling())
    return await _respond(
        head,
        params=params,
        stops=list(req.stop or []),  # type: ignore[arg-type]
        body=Completion(chat=False, model=head.model_id),
        stream=req.stream,
        include_usage=req.include_usage,
    )
