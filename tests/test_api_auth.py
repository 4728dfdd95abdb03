"""Who may do what on the API (appliance/head/api/middleware.py, `AuthAndCount`), every case.

The middleware in front of a stub application, driven as ASGI (httpx's ASGITransport, the
client address chosen per case); the same rules on a real head over real HTTP are in
tests/test_cluster_edges.py and tests/test_ansible.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from appliance.head.api.middleware import AuthAndCount

INFERENCE, ADMIN = "inference-key-1", "admin-key-2"


async def stub(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def call(method: str, path: str, *, key: str | None, api_key: str | None, admin_key: str | None,
         client: str = "192.0.2.7") -> httpx.Response:
    app = AuthAndCount(stub, api_key=api_key, admin_key=admin_key, count=lambda endpoint, status: None)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://head") as c:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return await c.request(method, path, headers=headers)

    return asyncio.run(go())


ADMIN_ROUTES = [("POST", "/v1/nodes/w1/drain"), ("POST", "/v1/nodes/w1/uncordon"), ("POST", "/v1/reload"),
                ("DELETE", "/v1/anything-added-later")]
READ_ROUTES = [("GET", "/v1/cluster"), ("GET", "/v1/events"), ("GET", "/v1/models")]
GENERATION = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
def test_state_changes_take_the_admin_key_only(method: str, path: str) -> None:
    keys = {"api_key": INFERENCE, "admin_key": ADMIN}
    r = call(method, path, key=INFERENCE, **keys)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
    assert call(method, path, key=None, **keys).status_code == 401
    assert call(method, path, key="guess", **keys).status_code == 401
    assert call(method, path, key=ADMIN, **keys).status_code == 200


@pytest.mark.parametrize("method, path", READ_ROUTES + GENERATION)
def test_reads_and_generation_take_either_key(method: str, path: str) -> None:
    keys = {"api_key": INFERENCE, "admin_key": ADMIN}
    assert call(method, path, key=INFERENCE, **keys).status_code == 200
    assert call(method, path, key=ADMIN, **keys).status_code == 200
    assert call(method, path, key=None, **keys).status_code == 401
    assert call(method, path, key=INFERENCE + "x", **keys).status_code == 401


def test_without_an_admin_key_state_changes_are_refused() -> None:
    r = call("POST", "/v1/reload", key=INFERENCE, api_key=INFERENCE, admin_key=None, client="127.0.0.1")
    assert r.status_code == 403 and "no admin key" in r.json()["error"]["message"]


def test_an_open_head_lets_only_its_own_loopback_change_state() -> None:
    """No keys at all (`anyway up`): the operator on the machine may drain; the LAN may not."""
    assert call("POST", "/v1/reload", key=None, api_key=None, admin_key=None, client="127.0.0.1").status_code == 200
    assert call("POST", "/v1/reload", key=None, api_key=None, admin_key=None, client="192.0.2.7").status_code == 403
    assert call("POST", "/v1/chat/completions", key=None, api_key=None, admin_key=None).status_code == 200


def test_health_and_metrics_stay_open() -> None:
    for path in ("/health", "/metrics"):
        assert call("GET", path, key=None, api_key=INFERENCE, admin_key=ADMIN).status_code == 200


def test_the_two_keys_must_differ() -> None:
    with pytest.raises(ValueError, match="differ"):
        AuthAndCount(stub, api_key="same", admin_key="same", count=lambda endpoint, status: None)
