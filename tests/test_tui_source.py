"""Unit tests of `HttpSource`, the dashboard's only door to the head, over httpx.MockTransport.

These check the HTTP mapping in isolation and fast: the bearer key, error JSON turned
into `HeadError` (status, code, message), a dead head into `HeadUnreachable`, and the
SSE stream (deltas, `[DONE]`, an error event mid-stream). The same code runs against a
real head in tests/test_tui_live.py; the mock only lets each error case be produced on
demand.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tui.source import HeadError, HeadUnreachable, HttpSource

MODEL = "tiny.Q4"


def sse(*objs: Any) -> bytes:
    return b"".join(f"data: {o if isinstance(o, str) else json.dumps(o)}\n\n".encode() for o in objs)


def chunk(text: str | None, *, role: bool = False) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""} if role else {"content": text}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def handler(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if request.headers.get("authorization") != "Bearer sekret":
        return httpx.Response(401, json={"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
    if path == "/v1/cluster":
        return httpx.Response(200, json={"nodes": [], "events_last_id": 0})
    if path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": MODEL}]})
    if path == "/v1/events":
        return httpx.Response(200, json={"events": [], "last_id": 0, "query": dict(request.url.params)})
    if path == "/v1/nodes/w2/drain":
        return httpx.Response(409, json={"error": {"message": "draining w2 would leave the model without room",
                                                    "code": "would_degrade"}})
    if path.startswith("/v1/nodes/") and path.endswith("/drain"):
        return httpx.Response(404, json={"error": {"message": "no node named 'nope'", "code": "node_not_found"}})
    if path == "/v1/chat/completions":
        body = json.loads(request.content)
        assert body["model"] == MODEL and body["stream"] is True and body["max_tokens"] == 16
        if body["messages"][-1]["content"] == "break":
            stream = sse(chunk(None, role=True), chunk("Hel"),
                         {"error": {"message": "engine lost a worker", "code": "cluster_degraded"}}, "[DONE]")
        else:
            stream = sse(chunk(None, role=True), chunk("Hel"), chunk("lo"), chunk("!"), "[DONE]")
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})
    return httpx.Response(404, json={"error": {"message": "Unknown path", "code": "not_found"}})


def source(*, api_key: str | None = "sekret") -> HttpSource:
    return HttpSource(url="http://head:8080/", api_key=api_key, max_tokens=16, transport=httpx.MockTransport(handler))


async def collect(src: HttpSource, text: str) -> list[str]:
    return [d async for d in src.chat_stream([{"role": "user", "content": text}])]


def test_reads_and_sends_the_key() -> None:
    async def main() -> None:
        src = source()
        assert (await src.cluster())["events_last_id"] == 0
        assert (await src.events(7))["query"] == {"since": "7"}
        assert (await src.events(node="w1"))["query"] == {"node": "w1"}
        with pytest.raises(HeadError) as err:
            await source(api_key=None).cluster()
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
        await src.aclose()

    asyncio.run(main())


def test_head_errors_carry_status_code_and_message() -> None:
    async def main() -> None:
        src = source()
        with pytest.raises(HeadError) as err:
            await src.drain("w2")
        assert (err.value.status, err.value.code) == (409, "would_degrade")
        assert "HTTP 409" in str(err.value) and "without room" in str(err.value)
        with pytest.raises(HeadError) as err:
            await src.drain("nope", force=True)
        assert (err.value.status, err.value.code) == (404, "node_not_found")

    asyncio.run(main())


def test_chat_stream_yields_deltas_and_raises_on_error_events() -> None:
    async def main() -> None:
        src = source()
        assert await collect(src, "hi") == ["Hel", "lo", "!"]
        with pytest.raises(HeadError, match="engine lost a worker"):
            await collect(src, "break")

    asyncio.run(main())


def test_nothing_listening_is_unreachable() -> None:
    async def main() -> None:
        from appliance.cli.up import free_port

        src = HttpSource(url=f"http://127.0.0.1:{free_port()}", timeout_s=2)
        with pytest.raises(HeadUnreachable, match="connection refused"):
            await src.cluster()
        with pytest.raises(HeadUnreachable):
            await collect(src, "hi")

    asyncio.run(main())
