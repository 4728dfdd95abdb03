"""The appliance surface: health, cluster state, events, metrics, and the operator's actions.

What `anyway status`, the dashboard and the deployment playbook read and call. Every
body is a model of `appliance.common.status` (the API's response models), so clients
parse it once; actions raise the head's domain errors, mapped to HTTP in api.errors.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from appliance.common.kinds import HealthState
from appliance.common.status import ClusterStatus, EventsPage, HealthResponse, NodeActionResult, ReloadResult
from appliance.head.api.deps import get_head
from appliance.head.supervisor import Head

router = APIRouter()

MAX_EVENTS_PAGE = 1000


@router.get("/health", response_model=HealthResponse)
async def health(head: Head = Depends(get_head)) -> JSONResponse:
    status, reason = head.health()
    body = HealthResponse(status=status, reason=reason, engine=head.engine.state, model=head.model_id)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if status == HealthState.OK else 503)


@router.get("/v1/cluster", response_model=ClusterStatus)
async def cluster(head: Head = Depends(get_head)) -> ClusterStatus:
    return head.cluster()


@router.get("/v1/events", response_model=EventsPage)
async def events(
    since: int = 0,
    limit: int = Query(default=200, ge=1, le=MAX_EVENTS_PAGE),
    node: str | None = None,
    head: Head = Depends(get_head),
) -> EventsPage:
    evs = head.events.for_node(node, limit) if node else head.events.since(since, limit)
    return EventsPage(events=evs, last_id=head.events.last_id)


@router.get("/metrics")
async def metrics(head: Head = Depends(get_head)) -> Response:
    return Response(head.metrics.text(), media_type="text/plain; version=0.0.4")


@router.post("/v1/nodes/{name}/drain", response_model=NodeActionResult, status_code=202)
async def drain(name: str, force: bool = False, head: Head = Depends(get_head)) -> NodeActionResult:
    return NodeActionResult(node=name, state=head.drain(name, force=force))


@router.post("/v1/nodes/{name}/uncordon", response_model=NodeActionResult)
async def uncordon(name: str, head: Head = Depends(get_head)) -> NodeActionResult:
    return NodeActionResult(node=name, state=head.uncordon(name))


@router.post("/v1/reload", response_model=ReloadResult)
async def reload(replan: bool = False, head: Head = Depends(get_head)) -> ReloadResult:
    head.reload(replan=replan)
    return ReloadResult(status="reloading")
