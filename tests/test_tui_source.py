"""Unit tests of `HttpSource`, the dashboard's only door to the head, over httpx.MockTransport.

These check the HTTP mapping in isolation and fast: the bearer key, answers parsed
once into the contract's models (appliance.common.status), a body that breaks the
contract turned into `UnexpectedAnswer` (one line, never an exception from pydantic),
error JSON turned into `HeadError` (status, code, message), a dead head into
`HeadUnreachable`, and the SSE stream (deltas, `[DONE]`, an error event mid-stream).
The same code runs against a real head in tests/test_tui_live.py; the mock only lets
each error case be produced on demand.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from appliance.common.kinds import EngineState, EventKind, HealthState, NodeState
from appliance.common.status import ClusterStatus, EventsPage, NodeActionResult, ReloadResult
from tui.source import HeadError, HeadUnreachable, HttpSource, SourceError, UnexpectedAnswer

MODEL = "tiny.Q4"

#: The smallest `GET /v1/cluster` body the contract accepts, plus a field it does not know.
CLUSTER: dict[str, Any] = {
    "version": "0.1.0",
    "health": {"status": "ok", "reason": ""},
    "model": {"id": MODEL, "n_layers": 8},
    "engine": {"state": "serving", "generation": 1},
    "nodes": [{"name": "w1", "state": "alive", "layers": [0, 8], "n_layers": 8, "from_the_future": True}],
    "events_last_id": 2,
    "a_newer_heads_field": {"ignored": True},
}

EVENTS: dict[str, Any] = {
    "events": [
        {"id": 1, "ts": 1.0, "kind": "join", "node": "w1", "message": "w1 joined"},
        {"id": 2, "ts": 2.0, "kind": "engine_ready", "node": "", "message": "engine #1 serving"},
    ],
    "last_id": 2,
}

#: Every request the mock head answered (method, path, query), newest last.
REQUESTS: list[tuple[str, str, dict[str, str]]] = []


def sse(*objs: Any) -> bytes:
    return b"".join(f"data: {o if isinstance(o, str) else json.dumps(o)}\n\n".encode() for o in objs)


def chunk(text: str | None, *, role: bool = False) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""} if role else {"content": text}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def handler(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    REQUESTS.append((request.method, path, dict(request.url.params)))
    if request.headers.get("authorization") != "Bearer sekret":
        return httpx.Response(401, json={"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
    if path == "/v1/cluster":
        return httpx.Response(200, json=CLUSTER)
    if path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": MODEL}]})
    if path == "/v1/events":
        return httpx.Response(200, json=EVENTS)
    if path == "/v1/nodes/w1/drain":
        return httpx.Response(200, json={"node": "w1", "state": "draining"})
    if path == "/v1/nodes/w1/uncordon":
        return httpx.Response(200, json={"node": "w1", "state": "alive"})
    if path == "/v1/reload":
        return httpx.Response(202, json={"status": "reloading"})
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
        REQUESTS.clear()
        status = await src.cluster()
        assert isinstance(status, ClusterStatus)
        assert status.events_last_id == 2 and status.health.status is HealthState.OK
        assert status.engine.state is EngineState.SERVING and status.model.id == MODEL
        w1 = status.node("w1")
        assert w1 is not None and w1.state is NodeState.ALIVE and w1.layers == (0, 8)
        page = await src.events(7)
        assert isinstance(page, EventsPage) and [e.kind for e in page.events] == [EventKind.JOIN, EventKind.ENGINE_READY]
        await src.events(node="w1")
        assert [q for _, p, q in REQUESTS if p == "/v1/events"] == [{"since": "7"}, {"node": "w1"}]
        with pytest.raises(HeadError) as err:
            await source(api_key=None).cluster()
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
        await src.aclose()

    asyncio.run(main())


def test_actions_answer_with_the_contracts_models() -> None:
    async def main() -> None:
        src = source()
        REQUESTS.clear()
        assert await src.drain("w1") == NodeActionResult(node="w1", state=NodeState.DRAINING)
        assert await src.uncordon("w1") == NodeActionResult(node="w1", state=NodeState.ALIVE)
        assert await src.reload() == ReloadResult(status="reloading")
        assert [(m, p) for m, p, _ in REQUESTS] == [
            ("POST", "/v1/nodes/w1/drain"),
            ("POST", "/v1/nodes/w1/uncordon"),
            ("POST", "/v1/reload"),
        ]

    asyncio.run(main())


def odd_source(body: bytes | Any, *, path: str = "/v1/cluster") -> HttpSource:
    """A head that answers `path` with `body` (JSON, or raw bytes as they are) and 200."""

    def odd(request: httpx.Request) -> httpx.Response:
        if request.url.path != path:
            return handler(request)
        if isinstance(body, bytes):
            return httpx.Response(200, content=body, headers={"content-type": "text/html"})
        return httpx.Response(200, json=body)

    return HttpSource(url="http://head:8080", api_key="sekret", transport=httpx.MockTransport(odd))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param({"nodes": [], "events_last_id": 0}, "version: Field required (and 3 more)", id="fields-missing"),
        pytest.param({**CLUSTER, "nodes": [{"name": "w1", "state": "zombie"}]}, "nodes.0.state: Input should be",
                     id="unknown-state"),
        pytest.param({**CLUSTER, "events_last_id": "many"}, "events_last_id: Input should be a valid integer",
                     id="mistyped"),
        pytest.param({**CLUSTER, "nodes": [{"name": "w1", "state": "alive", "layers": "0-8"}]}, "nodes.0.layers:",
                     id="garbage-layers"),
        pytest.param([CLUSTER], "the body is not a JSON object", id="a-list"),
        pytest.param(b"null", "the body is not a JSON object", id="null"),
        pytest.param(b"", "the body is not JSON", id="empty"),
        pytest.param(b"<html>proxy login</html>", "the body is not JSON", id="not-json"),
    ],
)
def test_a_cluster_body_that_breaks_the_contract_is_a_source_error(body: Any, reason: str) -> None:
    """A malformed `/v1/cluster` is an `UnexpectedAnswer` with a one-line reason, never pydantic's exception."""

    async def main() -> None:
        with pytest.raises(SourceError) as err:
            await odd_source(body).cluster()
        assert isinstance(err.value, UnexpectedAnswer) and isinstance(err.value, HeadError)
        assert err.value.status == 200
        message = str(err.value)
        assert message.startswith("unexpected answer from the head: /v1/cluster: "), message
        assert reason in message, message
        assert "\n" not in message and len(message) < 300, message
        assert err.value.__cause__ is None and err.value.__suppress_context__

    asyncio.run(main())


def test_events_and_action_answers_that_break_the_contract_are_source_errors() -> None:
    async def main() -> None:
        bad_kind = {"events": [{"id": 1, "ts": 1.0, "kind": "meteor_strike"}], "last_id": 1}
        with pytest.raises(UnexpectedAnswer, match=r"^unexpected answer from the head: /v1/events: events\.0\.kind: "):
            await odd_source(bad_kind, path="/v1/events").events(0)
        with pytest.raises(UnexpectedAnswer, match=r"/v1/nodes/w1/drain: state: "):
            await odd_source({"node": "w1", "state": "gone fishing"}, path="/v1/nodes/w1/drain").drain("w1")
        with pytest.raises(UnexpectedAnswer, match=r"/v1/reload: the body is not a JSON object$"):
            await odd_source("ok", path="/v1/reload").reload()

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
