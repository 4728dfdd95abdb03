"""Every error the API returns, in OpenAI's shape, mapped in one place.

`{"error": {"message", "type", "param", "code"}}` with the right status: what OpenAI's
clients parse. Domain errors raised below the API (the engine is unavailable or
rejected a request, an unknown node, a drain that would degrade) are mapped here and
nowhere else, so a streaming and a non-streaming request get the same error for the
same cause, and an error in the middle of a stream is the same body as before it.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.head.requests import EngineRequestError, EngineUnavailable
from appliance.head.supervisor import NodeNotFound, WouldDegrade


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


def unavailable(message: str, *, retry_after_s: int) -> ApiError:
    """503: the cluster cannot serve now; clients should retry after `retry_after_s`."""
    return ApiError(
        503, message, type_="server_error", code="cluster_degraded", headers={"Retry-After": str(retry_after_s)}
    )


def from_domain(exc: Exception, *, retry_after_s: int) -> ApiError:
    """The API error for an exception raised below the API; re-raises anything unknown."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineUnavailable):
        return unavailable(str(exc), retry_after_s=retry_after_s)
    if isinstance(exc, EngineRequestError):
        return ApiError(400, str(exc), code="engine_rejected")
    if isinstance(exc, NodeNotFound):
        return ApiError(404, str(exc), code="node_not_found")
    if isinstance(exc, WouldDegrade):
        return ApiError(409, str(exc), code="would_degrade")
    raise exc


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_field(part: object) -> bool:
    """Whether a location part names a field or an index, not a member of a union
    (pydantic adds those: `str`, `list[int]`, `literal['auto',...]`, `NamedToolChoice`)."""
    if isinstance(part, int):
        return True
    return bool(_FIELD.match(str(part))) and str(part) not in _TYPE_NAMES


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None, "invalid_request"
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"Invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None, "invalid_json"
    loc = [str(x) for x in e.get("loc", []) if x != "body" and _is_field(x)]
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if e.get("type") == "missing":
        return f"Missing required parameter: '{param}'", param, "missing_required_parameter"
    if not loc:
        return f"Request body must be a JSON object: {msg}", None, "invalid_request"
    return f"Invalid value for '{param}': {msg}", param, "invalid_value"


def install(app: FastAPI, *, retry_after_s: int) -> None:
    """Register the handlers that turn every error into OpenAI's shape."""

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

    for domain in (EngineUnavailable, EngineRequestError, NodeNotFound, WouldDegrade):

        @app.exception_handler(domain)
        async def _domain(_: Request, exc: Exception) -> JSONResponse:
            return from_domain(exc, retry_after_s=retry_after_s).response()
