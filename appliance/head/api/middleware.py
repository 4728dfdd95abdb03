"""The API's middleware, as pure ASGI (no per-request task or body buffering).

* `BodyLimit`: a body over the limit gets 413 without being read whole (Content-Length
  up front, or while a chunked body streams in).
* `AuthAndCount`: the bearer key on /v1 (constant-time comparison), and request
  counts per endpoint and status for /metrics.
"""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable

from appliance.head.api.errors import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, without reading them all."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_big(self) -> ApiError:
        return ApiError(413, f"request body is larger than {self.limit} bytes", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.limit:
                        await self._too_big().response()(scope, receive, send)
                        return
                except ValueError:
                    pass
        seen = 0
        started = refused = False

        async def limited() -> Message:
            # A chunked body (no Content-Length) is counted as it streams in: past the limit,
            # the client gets 413 and the application sees the client gone.
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request" and not refused:
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    refused = True
                    if not started:
                        await self._too_big().response()(scope, receive, send_raw)
                    return {"type": "http.disconnect"}
            return msg

        async def send_raw(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        async def tracking_send(msg: Message) -> None:
            if refused:
                return  # the 413 went out already; what the application says after is dropped
            await send_raw(msg)

        await self.app(scope, limited, tracking_send)


class AuthAndCount:
    """Bearer key on /v1 paths when one is configured; count POSTs on /v1 by status."""

    GENERATION = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app: ASGIApp, *, api_key: str | None, count: Callable[[str, int], None]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        counted = path.startswith("/v1/") and scope.get("method") == "POST"
        endpoint = path if path in self.GENERATION else "/v1/other"
        if self.expected is not None and path.startswith("/v1/"):
            auth = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
            if not hmac.compare_digest(auth, self.expected):
                self.count(path if path in self.GENERATION else "/v1/other", 401)
                await ApiError(401, "Incorrect API key provided", code="invalid_api_key").response()(
                    scope, receive, send
                )
                return

        async def counting_send(msg: Message) -> None:
            if counted and msg["type"] == "http.response.start":
                self.count(endpoint, int(msg["status"]))
            await send(msg)

        await self.app(scope, receive, counting_send)
