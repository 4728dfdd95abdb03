"""The head's HTTP API: OpenAI-compatible endpoints plus the cluster's state and actions.

OpenAI surface: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both
streaming over SSE or not). Errors use OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`; bad input is a 4xx with a clear
message and never disturbs other requests.

Appliance surface (what `anyway status`, the dashboard and the playbook read):
GET /health, GET /v1/cluster, GET /v1/events?since=ID, GET /metrics (Prometheus),
POST /v1/nodes/{name}/drain, POST /v1/nodes/{name}/uncordon, POST /v1/reload.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import logs
from .engine_manager import EngineRequestError, EngineUnavailable, GenParams
from .tokenizer import Detokenizer, StopMatcher, TemplateError

if TYPE_CHECKING:
    from .head import Head

log = logs.get("head.api")

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


class ChatRequest(_GenRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_GenRequest):
    prompt: str | list[str] | list[int] = Field()
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    best_of: int = Field(default=1, ge=1, le=1)
    logprobs: None = None


# --------------------------------------------------------------- helpers
def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, without reading them all."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(
            413, f"request body is larger than {self.limit} bytes", code="request_too_large"
        ).response()
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.limit:
                        await too_big(scope, receive, send)
                        return
                except ValueError:
                    pass
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body is larger than {self.limit} bytes", code="request_too_large")
            return msg

        try:
            await self.app(scope, limited, send)
        except ApiError as e:
            await e.response()(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None, "invalid_request"
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"Invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None, "invalid_json"
    loc = [str(x) for x in e.get("loc", []) if x != "body"]
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if e.get("type") == "missing":
        return f"Missing required parameter: '{param}'", param, "missing_required_parameter"
    if not loc:
        return f"Request body must be a JSON object: {msg}", None, "invalid_request"
    return f"Invalid value for '{param}': {msg}", param, "invalid_value"


def build_app(head: "Head") -> FastAPI:
    app = FastAPI(title="Anyway", version=head.__class__.__module__, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return ApiError(400, message, param=param, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = {404: "Unknown path", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, msg, code=code).response()

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if head.cfg.api_key and path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {head.cfg.api_key}":
                head.metrics.requests.labels(endpoint=path, status="401").inc()
                return ApiError(401, "Incorrect API key provided", code="invalid_api_key").response()
        response = await call_next(request)
        if path.startswith("/v1/") and request.method == "POST":
            endpoint = path if path in ("/v1/chat/completions", "/v1/completions") else "/v1/other"
            head.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    def _check_model(model: str) -> None:
        if model != head.model_id:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this cluster serves '{head.model_id}'",
                param="model",
                code="model_not_found",
            )

    def _n_ctx() -> int:
        assert head.engine is not None
        return int(head.engine.info.get("n_ctx_seq") or head.cfg.n_ctx)

    def _check_available() -> None:
        why = head.degraded_reason()
        if why:
            raise ApiError(
                503,
                f"The cluster is degraded and cannot serve the model right now: {why}",
                type_="server_error",
                code="cluster_degraded",
                headers={"Retry-After": str(head.timing.RETRY_AFTER_S)},
            )

    def _budget(prompt_len: int, max_tokens: int | None, param: str) -> int:
        n_ctx = _n_ctx()
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

    async def _generate(
        *, params: GenParams, stops: list[str], stream_chunk: Any, final: Any, stream: bool, include_usage: bool
    ) -> Response:
        assert head.engine is not None
        prompt_len = len(params.prompt)
        head.metrics.prompt_tokens.inc(prompt_len)
        t0 = time.monotonic()
        state: dict[str, Any] = {"count": 0, "finish": None}

        async def run() -> AsyncIterator[str]:
            engine = head.engine
            assert engine is not None
            detok = Detokenizer(head.tokenizer)
            matcher = StopMatcher(stops)
            gen = engine.generate(params, degraded=head.degraded_reason)
            first = True
            try:
                async for tok in gen:
                    if first:
                        head.metrics.ttft.observe(time.monotonic() - t0)
                        first = False
                    state["count"] += 1
                    head.metrics.tokens.inc()
                    text = matcher.push(detok.push(tok))
                    if text:
                        yield text
                    if matcher.hit:
                        state["finish"] = "stop"
                        return
                tail = matcher.push(detok.flush())
                if not matcher.hit:
                    tail += matcher.flush()
                else:
                    state["finish"] = "stop"
                if tail:
                    yield tail
                state["finish"] = state["finish"] or params.finish_reason or "length"
            finally:
                await gen.aclose()
                if params.resumes:
                    head.metrics.resumed.inc(params.resumes)

        def usage() -> dict[str, int]:
            return {
                "prompt_tokens": prompt_len,
                "completion_tokens": state["count"],
                "total_tokens": prompt_len + state["count"],
            }

        if not stream:
            parts: list[str] = []
            try:
                async for piece in run():
                    parts.append(piece)
            except EngineUnavailable as exc:
                raise ApiError(
                    503,
                    str(exc),
                    type_="server_error",
                    code="cluster_degraded",
                    headers={"Retry-After": str(head.timing.RETRY_AFTER_S)},
                ) from None
            except EngineRequestError as exc:
                raise ApiError(400, str(exc), code="engine_rejected") from None
            return JSONResponse(final("".join(parts), state["finish"] or "length", usage()))

        # Streaming: check the first step before committing to a 200.
        agen = run()
        try:
            first_piece: str | None = await agen.__anext__()
        except StopAsyncIteration:
            first_piece = None
        except EngineUnavailable as exc:
            raise ApiError(
                503, str(exc), type_="server_error", code="cluster_degraded",
                headers={"Retry-After": str(head.timing.RETRY_AFTER_S)},
            ) from None
        except EngineRequestError as exc:
            raise ApiError(400, str(exc), code="engine_rejected") from None

        async def body() -> AsyncIterator[bytes]:
            yield _sse(stream_chunk(None, None, role=True))
            try:
                if first_piece:
                    yield _sse(stream_chunk(first_piece, None))
                async for piece in agen:
                    yield _sse(stream_chunk(piece, None))
                yield _sse(stream_chunk(None, state["finish"] or "length"))
                if include_usage:
                    yield _sse(stream_chunk(None, None, usage=usage()))
            except (EngineUnavailable, EngineRequestError) as exc:
                err = ApiError(503, str(exc), type_="server_error", code="cluster_degraded")
                yield _sse(err.body())
            finally:
                await agen.aclose()
            yield _sse("[DONE]")

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    # ------------------------------------------------------------ routes
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
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
                        "n_ctx": _n_ctx(),
                        "weight_bytes": p.total_weight_bytes,
                        "chat_template": p.has_chat_template,
                    },
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Response:
        _check_model(req.model)
        _check_available()
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            prompt = head.tokenizer.format_chat(messages)
        except TemplateError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_messages") from None
        tokens = head.tokenizer.encode(prompt.text, add_bos=prompt.add_bos)
        max_tokens = req.max_completion_tokens or req.max_tokens
        budget = _budget(len(tokens), max_tokens, "max_tokens" if max_tokens else "messages")
        params = GenParams(prompt=tokens, max_new=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str | None, finish: str | None, *, role: bool = False, usage: dict[str, int] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": head.model_id}
            if usage is not None:
                out["choices"] = []
                out["usage"] = usage
                return out
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            return out

        def final(text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": head.model_id,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
                ],
                "usage": usage,
            }

        return await _generate(
            params=params,
            stops=list(req.stop or []) + list(prompt.stop),  # type: ignore[arg-type]
            stream_chunk=chunk,
            final=final,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        _check_model(req.model)
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        _check_available()
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
        budget = _budget(len(tokens), req.max_tokens, "max_tokens")
        params = GenParams(prompt=tokens, max_new=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str | None, finish: str | None, *, role: bool = False, usage: dict[str, int] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": head.model_id}
            if usage is not None:
                out["choices"] = []
                out["usage"] = usage
                return out
            out["choices"] = [{"index": 0, "text": "" if role else (text or ""), "logprobs": None, "finish_reason": finish}]
            return out

        def final(text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": head.model_id,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            }

        return await _generate(
            params=params,
            stops=list(req.stop or []),  # type: ignore[arg-type]
            stream_chunk=chunk,
            final=final,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        status, reason = head.health()
        assert head.engine is not None
        body = {"status": status, "reason": reason, "engine": head.engine.state, "model": head.model_id}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/cluster")
    async def cluster() -> dict[str, Any]:
        return head.cluster()

    @app.get("/v1/events")
    async def events(since: int = 0, limit: int = 200, node: str | None = None) -> dict[str, Any]:
        evs = head.events.for_node(node, limit) if node else head.events.since(since, max(1, min(limit, 1000)))
        return {"events": [e.to_dict() for e in evs], "last_id": head.events.last_id}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(head.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/nodes/{name}/drain")
    async def drain(name: str, force: bool = False) -> JSONResponse:
        status, body = head.drain(name, force=force)
        if status >= 400:
            raise ApiError(status, body["message"], code=body.get("code"))
        return JSONResponse(body, status_code=status)

    @app.post("/v1/nodes/{name}/uncordon")
    async def uncordon(name: str) -> JSONResponse:
        status, body = head.uncordon(name)
        if status >= 400:
            raise ApiError(status, body["message"], code=body.get("code"))
        return JSONResponse(body, status_code=status)

    @app.post("/v1/reload")
    async def reload() -> dict[str, Any]:
        return head.reload()

    return BodyLimit(app, head.cfg.max_body_bytes)  # type: ignore[return-value]


async def serve(app: Any, *, host: str, port: int) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        http="auto",  # httptools when installed
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    log.info("api_listening", url=f"http://{host}:{port}/v1")
    await server.serve()
