"""Where the dashboard's data comes from: the head's HTTP API, behind one small interface.

The dashboard holds no cluster logic: it renders what `GET /v1/cluster` and
`GET /v1/events` return and calls the head's actions (drain, uncordon, reload, chat).
`ClusterSource` is that whole surface, typed with the API's own models
(appliance.common.status): `HttpSource` parses each answer once, so screens read
attributes and never guess at the shape of a dict. `HttpSource` implements it against
a real head with httpx; the snapshot tests implement it with fixed data so screenshots
are deterministic. Every failure surfaces as a `SourceError` (a body that does not
match the contract is an `UnexpectedAnswer`), so the UI can show it as a notification
or a "head unreachable" banner and never crash.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from appliance.common.status import ClusterStatus, EventsPage, NodeActionResult, ReloadResult

__all__ = [
    "ClusterSource",
    "HeadError",
    "HeadUnreachable",
    "HttpSource",
    "SourceError",
    "UnexpectedAnswer",
    "parse_answer",
]

M = TypeVar("M", bound=BaseModel)

Messages = list[dict[str, str]]


class SourceError(Exception):
    """Anything that went wrong talking to the head; `str()` is a one-line message for humans."""


class HeadUnreachable(SourceError):
    """The head did not answer (refused, timed out, connection dropped)."""


class HeadError(SourceError):
    """The head answered with an error (HTTP 4xx/5xx, or an error event mid-stream)."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class UnexpectedAnswer(HeadError):
    """The head answered, but not with what the contract (appliance.common.status) says:
    not JSON, or a body that does not validate (an older or broken head, a proxy's page)."""


def parse_answer(model: type[M], body: Any, *, what: str = "", status: int = 0) -> M:
    """`body` (decoded JSON) as `model`, or an `UnexpectedAnswer` with a one-line reason.

    `what` names the request in the message (e.g. "/v1/cluster"), `status` is the HTTP
    status it came with. Extra fields are ignored by the models, so only a missing or
    mistyped field (or an unknown kind or state) is refused.
    """
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        where = f"{what}: " if what else ""
        raise UnexpectedAnswer(
            f"unexpected answer from the head: {where}{_validation_reason(exc)}", status=status
        ) from None


def _validation_reason(exc: ValidationError) -> str:
    """The first validation error as 'loc: msg (and N more)', on one line, bounded."""
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic always reports at least one
        return "invalid body"
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", ()))
    if not loc and first.get("type") == "model_type":
        reason = "the body is not a JSON object"
    else:
        reason = f"{loc or 'body'}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more)"
    reason = " ".join(reason.split())
    return reason if len(reason) <= 200 else reason[:199] + "…"


class ClusterSource(abc.ABC):
    """The head's API as the dashboard sees it. Implementations raise `SourceError` only."""

    #: Shown in the header (e.g. the head's URL).
    label: str = ""

    @abc.abstractmethod
    async def cluster(self) -> ClusterStatus:
        """`GET /v1/cluster`."""

    @abc.abstractmethod
    async def events(self, since: int = 0, *, node: str | None = None) -> EventsPage:
        """`GET /v1/events?since=ID` (or `?node=NAME`): the events after `since`, oldest first."""

    @abc.abstractmethod
    async def drain(self, node: str, *, force: bool = False) -> NodeActionResult:
        """`POST /v1/nodes/{node}/drain[?force=true]`."""

    @abc.abstractmethod
    async def uncordon(self, node: str) -> NodeActionResult:
        """`POST /v1/nodes/{node}/uncordon`."""

    @abc.abstractmethod
    async def reload(self) -> ReloadResult:
        """`POST /v1/reload`."""

    @abc.abstractmethod
    def chat_stream(self, messages: Messages) -> AsyncIterator[str]:
        """Stream a chat completion for `messages`; yields the answer's text deltas."""

    async def aclose(self) -> None:
        """Release connections (called when the app exits)."""


def _error_message(response: httpx.Response) -> HeadError:
    """Turn an API error response (`{"error": {"message", "code"}}`) into a HeadError."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message, code = "", None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message, code = str(err.get("message") or ""), err.get("code")
        elif isinstance(body.get("message"), str):
            message = body["message"]
    if not message:
        message = (response.text or response.reason_phrase or "error").strip()[:200]
    return HeadError(f"HTTP {response.status_code}: {message}", status=response.status_code, code=code)


class HttpSource(ClusterSource):
    """`ClusterSource` over the head's HTTP API (httpx.AsyncClient, bearer key if given)."""

    def __init__(
        self,
        *,
        url: str,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout_s: float = 5.0,
        max_tokens: int | None = 512,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`max_tokens` caps each chat answer (None: the head's own limit, the context size);
        `transport` replaces the network (httpx.MockTransport in unit tests). `admin_key` is
        sent with drain, uncordon and reload only (the head refuses them the inference key)."""
        self.url = url.rstrip("/")
        self.max_tokens = max_tokens
        self.transport = transport
        self.label = self.url
        self.api_key = api_key
        self.admin_key = admin_key
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._model_id: str | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created lazily, inside the running event loop that will use it.
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 3.0)),
                transport=self.transport,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, admin: bool = False
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body) of a successful answer; every failure as a `SourceError`.
        `admin`: an action that changes state, sent with the admin key."""
        headers = {"Authorization": f"Bearer {self.admin_key}"} if admin and self.admin_key else None
        try:
            response = await self._http().request(method, path, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"{self.url}: {_transport_reason(exc)}") from None
        if response.status_code >= 400:
            raise _error_message(response)
        try:
            return response.status_code, response.json()
        except ValueError:
            raise UnexpectedAnswer(
                f"unexpected answer from the head: {path}: the body is not JSON", status=response.status_code
            ) from None

    async def _parsed(
        self, model: type[M], method: str, path: str, *, params: dict[str, Any] | None = None, admin: bool = False
    ) -> M:
        status, body = await self._request(method, path, params=params, admin=admin)
        return parse_answer(model, body, what=path, status=status)

    async def cluster(self) -> ClusterStatus:
        return await self._parsed(ClusterStatus, "GET", "/v1/cluster")

    async def events(self, since: int = 0, *, node: str | None = None) -> EventsPage:
        params: dict[str, Any] = {"node": node} if node else {"since": since}
        return await self._parsed(EventsPage, "GET", "/v1/events", params=params)

    async def drain(self, node: str, *, force: bool = False) -> NodeActionResult:
        params = {"force": "true"} if force else None
        return await self._parsed(NodeActionResult, "POST", f"/v1/nodes/{node}/drain", params=params, admin=True)

    async def uncordon(self, node: str) -> NodeActionResult:
        return await self._parsed(NodeActionResult, "POST", f"/v1/nodes/{node}/uncordon", admin=True)

    async def reload(self) -> ReloadResult:
        return await self._parsed(ReloadResult, "POST", "/v1/reload", admin=True)

    async def _model(self) -> str:
        """The id of the model the head serves (`GET /v1/models`, OpenAI's shape), cached."""
        if self._model_id is None:
            _, models = await self._request("GET", "/v1/models")
            data = models.get("data") if isinstance(models, dict) else None
            first = data[0] if isinstance(data, list) and data else None
            if not isinstance(first, dict) or not first.get("id"):
                raise HeadError("the head serves no model")
            self._model_id = str(first["id"])
        return self._model_id

    async def chat_stream(self, messages: Messages) -> AsyncIterator[str]:
        body: dict[str, Any] = {"model": await self._model(), "messages": messages, "stream": True}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        # Generation may pause (a re-plan mid-answer): a long read timeout, short connect.
        timeout = httpx.Timeout(120.0, connect=3.0)
        try:
            async with self._http().stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_message(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    if isinstance(chunk.get("error"), dict):
                        raise HeadError(str(chunk["error"].get("message", "error")), code=chunk["error"].get("code"))
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") if isinstance(choice, dict) else None
                        text = delta.get("content") if isinstance(delta, dict) else None
                        if isinstance(text, str) and text:
                            yield text
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"{self.url}: {_transport_reason(exc)}") from None


def _transport_reason(exc: httpx.TransportError) -> str:
    """A short reason for a failed request: 'connection refused', 'timed out', ..."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    detail = str(exc) or exc.__class__.__name__
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in detail.lower() else f"cannot connect ({detail})"
    return detail
