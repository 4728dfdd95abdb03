"""The head's HTTP API: the FastAPI application and the server that runs it.

Two routers: the OpenAI-compatible surface (api.openai) and the appliance's own
(api.cluster: health, cluster state, events, metrics, operator actions). Errors are
OpenAI's JSON shape everywhere (api.errors); bodies are size-limited and /v1 is behind
the inference key, state changes behind the admin key, both as pure ASGI middleware
(api.middleware). The server is uvicorn on
uvloop/httptools, stopped by the head's supervisor, never by its own signal handlers.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from fastapi import FastAPI

from appliance import __version__
from appliance.common import logs
from appliance.head.api import cluster, errors, openai
from appliance.head.api.middleware import AuthAndCount, BodyLimit
from appliance.head.supervisor import Head

log = logs.get("head.api")


def build_app(head: Head) -> Any:
    """The ASGI application serving `head`."""
    app = FastAPI(title="Anyway", version=__version__, docs_url=None, redoc_url=None)
    app.state.head = head
    errors.install(app, retry_after_s=head.timing.recovery.RETRY_AFTER_S)
    app.include_router(openai.router)
    app.include_router(cluster.router)

    def count(endpoint: str, status: int) -> None:
        head.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    auth = AuthAndCount(app, api_key=head.cfg.api_key, admin_key=head.cfg.admin_key, count=count)
    return BodyLimit(auth, head.cfg.max_body_bytes)


class ApiServer:
    """uvicorn serving `build_app(head)` on host:port until `shutdown()`."""

    def __init__(self, head: Head, *, host: str, port: int) -> None:
        config = uvicorn.Config(
            build_app(head),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            http="auto",  # httptools when installed
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.url = f"http://{host}:{port}/v1"

    async def serve(self) -> None:
        log.info("api_listening", url=self.url)
        await self.server.serve()
        if not self.server.should_exit:
            raise RuntimeError("the API server stopped")
        # An asked-for exit (shutdown) returns normally; the supervisor is stopping then.

    async def shutdown(self) -> None:
        self.server.should_exit = True
