"""What the API's routes depend on: the `Head` they serve, injected per request."""

from __future__ import annotations

from fastapi import Request

from appliance.head.supervisor import Head


def get_head(request: Request) -> Head:
    return request.app.state.head  # type: ignore[no-any-return]
