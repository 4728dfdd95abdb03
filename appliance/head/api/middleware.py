"""The API's middleware, as pure ASGI (no per-request task or body buffering).

* `BodyLimit`: a body over the limit gets 413 without being read whole (Content-Length
  up front, or while a chunked body streams in).
* `AuthAndCount`: two bearer keys on /v1 (constant-time comparisons), and request counts
  per endpoint and status for /metrics. The inference key (or the admin key) reads and
  generates; only the admin key changes state: any /v1 request other than GET/HEAD that
  is not a generation (drain, uncordon, reload, and whatever is added later: fail closed).
  Without an admin key, state changes are refused, except on a head with no keys at all
  for a client on the head's own loopback (`anyway up`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
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


def _digest(key: str | None) -> bytes | None:
    return hashlib.sha256(f"Bearer {key}".encode()).digest() if key else None


def _is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    try:
        return bool(client) and ipaddress.ip_address(str(client[0])).is_loopback
    except ValueError:
        return False


class AuthAndCount:
    """Bearer keys on /v1 paths (inference and admin); count POSTs on /v1 by status."""

    GENERATION = ("/v1/chat/completions", "/v1/completions")
    READ_METHODS = ("GET", "HEAD")

    def __init__(
        self, app: ASGIApp, *, api_key: str | None, admin_key: str | None = None, count: Callable[[str, int], None]
    ) -> None:
        if api_key and admin_key and hmac.compare_digest(api_key.encode(), admin_key.encode()):
            raise ValueError("the admin key must differ from the inference key")
        self.app = app
        self.inference = _digest(api_key)
        self.admin = _digest(admin_key)
        self.count = count

    def _keys(self, scope: Scope) -> tuple[bool, bool]:
        """(holds the admin key, holds the inference key); both compared in constant time, always."""
        auth = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        given = hashlib.sha256(auth).digest()
        is_admin = hmac.compare_digest(given, self.admin or b"\0" * 32) and self.admin is not None
        is_inference = hmac.compare_digest(given, self.inference or b"\0" * 32) and self.inference is not None
        return is_admin, is_inference

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, path: str, status: int, message: str, code: str) -> None:
        self.count(path if path in self.GENERATION else "/v1/other", status)
        await ApiError(status, message, code=code).response()(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        counted = path.startswith("/v1/") and method == "POST"
        endpoint = path if path in self.GENERATION else "/v1/other"
        if path.startswith("/v1/"):
            is_admin, is_inference = self._keys(scope)
            if method not in self.READ_METHODS and path not in self.GENERATION:  # changes state: admin only
                if not is_admin:
                    open_local = self.admin is None and self.inference is None and _is_loopback(scope)
                    if not open_local:
                        if self.admin is None:
                            await self._refuse(scope, receive, send, path, 403, "admin actions are disabled: the head has "
                                               "no admin key (ANYWAY_ADMIN_KEY or --admin-key-file)", "admin_key_required")
                        elif is_inference:
                            await self._refuse(scope, receive, send, path, 403, "the inference key cannot change the "
                                               "cluster: drain, uncordon and reload need the admin key", "admin_key_required")
                        else:
                            await self._refuse(scope, receive, send, path, 401, "Incorrect API key provided", "invalid_api_key")
                        return
            elif self.inference is not None and not (is_inference or is_admin):
                await self._refuse(scope, receive, send, path, 401, "Incorrect API key provided", "invalid_api_key")
                return

        async def counting_send(msg: Message) -> None:
            if counted and msg["type"] == "http.response.start":
                self.count(endpoint, int(msg["status"]))
            await send(msg)

        await self.app(scope, receive, counting_send)
