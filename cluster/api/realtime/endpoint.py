"""The `/v1/realtime` handshake: the API key names the tenant, the call is admitted before the socket is
accepted, and a refusal is an HTTP answer where the server can send one.

The key comes in `Authorization: Bearer <key>`. Browsers cannot set a header on a WebSocket, so, as OpenAI does for
them, a handshake without that header may offer the subprotocols `realtime` and `openai-insecure-api-key.<key>`
instead (the `/console` page does); the socket is then accepted with subprotocol `realtime`."""

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

SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # followed by the key: how a browser sends it


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, session_id: str | None = None) -> None:
    services: Services = websocket.app.state.services
    tenant = services.tenants.tenant_for(_api_key(websocket))
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
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in _offered(websocket) else None)
        ticket.started()
        await RealtimeCall(websocket, services, tenant).run(session_id)
    finally:
        await services.release_call(ticket, "realtime")


def _api_key(websocket: WebSocket) -> str | None:
    if (header := websocket.headers.get("authorization")) is not None:
        return _bearer(header)
    keys = [p.removeprefix(KEY_SUBPROTOCOL) for p in _offered(websocket) if p.startswith(KEY_SUBPROTOCOL)]
    return keys[0] if keys and keys[0] else None


def _offered(websocket: WebSocket) -> list[str]:
    return websocket.scope.get("subprotocols") or []


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
