"""The `/v1/realtime` handshake: the API key names the tenant, the call is admitted before the socket is
accepted, and a refusal is an HTTP answer where the server can send one."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse

from cluster.api.errors import http_status
from cluster.api.realtime.connection import RealtimeCall
from cluster.api.realtime.events import Error
from cluster.api.services import Services
from cluster.errors import Unauthorized
from model.errors import ChromaError

router = APIRouter()


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, session_id: str | None = None) -> None:
    services: Services = websocket.app.state.services
    tenant = services.tenants.tenant_for(_bearer(websocket.headers.get("authorization")))
    if tenant is None:
        refusal = Unauthorized("missing or unknown API key (send 'Authorization: Bearer <key>')")
        await _refuse(websocket, services, refusal)
        return
    try:
        ticket = await services.admit_call(tenant, "realtime")
    except ChromaError as refusal:
        await _refuse(websocket, services, refusal)
        return
    try:
        await websocket.accept()
        ticket.started()
        await RealtimeCall(websocket, services, tenant).run(session_id)
    finally:
        await services.release_call(ticket, "realtime")


def _bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _refuse(websocket: WebSocket, services: Services, refusal: ChromaError) -> None:
    """Refuse at the handshake: an HTTP answer where the server can send one (401, 429 or 503 with Retry-After),
    else close with the matching code (1008 policy violation, 1013 try again later) after an `error` event."""
    services.metrics.calls_refused.labels(refusal.code).inc()
    status = http_status(refusal)
    headers = None if isinstance(refusal, Unauthorized) else {"Retry-After": str(services.settings.retry_after_s)}
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        body = {"error": {"code": refusal.code, "message": refusal.message}}
        await websocket.send_denial_response(JSONResponse(body, status_code=status, headers=headers))
        return
    await websocket.accept()
    await websocket.send_text(Error.of(refusal.code, refusal.message).model_dump_json())
    await websocket.close(code=1008 if status == 401 else 1013, reason=refusal.code)
