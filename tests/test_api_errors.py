"""The API's error mapping, through the real ASGI application.

An engine that rejects a request after the stream has started cannot be produced on demand
(the head's own checks keep every prompt + replay inside the context), so these tests drive
the real FastAPI app over httpx's ASGI transport with a stand-in for the head whose request
router rejects on cue. Everything else in the path is the product's code: routing,
validation, tokenization with the model's real vocabulary, SSE framing, error bodies.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import httpx
import pytest

from appliance import __version__
from appliance.common import engine_protocol as ep
from appliance.common.config import Timing
from appliance.head.api.app import build_app
from appliance.head.metrics import Metrics
from appliance.head.requests import Admission, EngineRequestError, EngineUnavailable, GenParams
from appliance.head.text import Tokenizer


class RejectingRouter:
    """Yields `before` tokens, then fails the way the engine or the recovery wait would."""

    def __init__(self, exc: Exception, before: int) -> None:
        self.exc, self.before = exc, before

    async def generate(self, params: GenParams, *, degraded: Any) -> AsyncIterator[ep.Sampled]:
        for _ in range(self.before):
            yield ep.Sampled("r", params.prompt[-1])
        raise self.exc


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(str(tiny_model))


def head_with(router: Any, tokenizer: Tokenizer) -> Any:
    return SimpleNamespace(
        model_id="m",
        timing=Timing(),
        cfg=SimpleNamespace(api_key=None, admin_key=None, max_body_bytes=1 << 20, max_tokens=0, speculative=True),
        metrics=Metrics(),
        tokenizer=tokenizer,
        engine=SimpleNamespace(n_ctx_served=2048),
        router=router,
        degraded_reason=lambda: "",
        profile=SimpleNamespace(vocab_size=49152),
        admission=Admission(limit=8),
        text_pool=ThreadPoolExecutor(max_workers=1),
    )


async def _post(app: Any, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://head") as c:
        return await c.post("/v1/completions", json=body)


def sse_error(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            return json.loads(line[6:])  # type: ignore[no-any-return]
    raise AssertionError(f"no error event in {text!r}")


@pytest.mark.parametrize(
    "exc, status, code",
    [
        pytest.param(EngineRequestError("the engine refused it"), 400, "engine_rejected", id="engine-rejects"),
        pytest.param(EngineUnavailable("no engine within 120s"), 503, "cluster_degraded", id="no-engine"),
    ],
)
def test_an_error_mid_stream_is_the_same_error_as_without_streaming(tokenizer, exc, status, code) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "m", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}
    plain = asyncio.run(_post(build_app(head_with(RejectingRouter(exc, before=2), tokenizer)), body))
    streamed = asyncio.run(_post(build_app(head_with(RejectingRouter(exc, before=2), tokenizer)), {**body, "stream": True}))
    assert plain.status_code == status and plain.json()["error"]["code"] == code
    assert streamed.status_code == 200  # the stream had started: the error comes as an event
    assert sse_error(streamed.text) == plain.json()
    assert streamed.text.rstrip().endswith("data: [DONE]")
    # Before the first token, a streaming request gets the same HTTP error as a plain one.
    early = asyncio.run(_post(build_app(head_with(RejectingRouter(exc, before=0), tokenizer)), {**body, "stream": True}))
    assert early.status_code == status and early.json() == plain.json()


def test_openapi_document_names_the_product_version(tokenizer) -> None:  # type: ignore[no-untyped-def]
    async def get() -> httpx.Response:
        app = build_app(head_with(RejectingRouter(RuntimeError(), 0), tokenizer))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://head") as c:
            return await c.get("/openapi.json")

    info = asyncio.run(get()).json()["info"]
    assert info["version"] == __version__ and info["title"] == "Anyway"
