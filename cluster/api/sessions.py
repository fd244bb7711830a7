"""/v1/sessions: a conversation in one voice (settings and turn history, in Redis with a TTL).

A session's `truncation` (OpenAI Realtime GA semantics, cluster.state.history) says what happens when its history
outgrows the Reasoner's context; `dropped` in its JSON records what left. `DELETE .../history/{item_id}` removes
one message (what a session with truncation "disabled" does to go on).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from cluster.api.errors import error_responses, validation_message
from cluster.api.media import read_body
from cluster.api.schemas import SessionCreate, SessionOut, SessionUpdate
from cluster.api.services import ServicesDep, TenantDep
from model.errors import InvalidInput

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

JSON_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": SessionCreate.model_json_schema()}}}
}


@router.post(
    "", status_code=201, response_model=SessionOut, openapi_extra=JSON_BODY,
    responses=error_responses(400, 401, 404, 413, 422, 503),
)
async def create_session(request: Request, tenant: TenantDep, services: ServicesDep) -> SessionOut:
    """A new session in a voice of this tenant (TTL 1 h, renewed by each use)."""
    body = await read_body(request, services.settings.max_body_bytes)
    spec = _parse(SessionCreate, body or b"{}")
    truncation = spec.truncation or services.backend.history.settings.truncation
    return await services.state.create_session(tenant, spec.voice_id, spec.system_prompt, spec.output_format,
                                               spec.sampling, truncation)


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc.errors())) from None


@router.get("/{session_id}", response_model=SessionOut, responses=error_responses(401, 404, 503))
async def get_session(session_id: str, tenant: TenantDep, services: ServicesDep) -> SessionOut:
    return await services.state.get_session(tenant, session_id)


@router.patch(
    "/{session_id}", response_model=SessionOut, responses=error_responses(400, 401, 404, 409, 413, 422, 503),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": SessionUpdate.model_json_schema()}}}},
)
async def update_session(session_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> SessionOut:
    """Change the session's voice, system prompt or truncation; the history stays."""
    spec = _parse(SessionUpdate, await read_body(request, services.settings.max_body_bytes) or b"{}")
    session = await services.state.get_session(tenant, session_id)
    return await services.state.update_settings(tenant, session, system_prompt=spec.system_prompt,
                                                voice_id=spec.voice_id, truncation=spec.truncation)


@router.delete("/{session_id}/history/{item_id}", response_model=SessionOut,
               responses=error_responses(401, 404, 503))
async def delete_history_item(session_id: str, item_id: str, tenant: TenantDep, services: ServicesDep) -> SessionOut:
    """Remove one message from the history (and its caller audio): the Reasoner no longer reads it."""
    return await services.state.delete_item(tenant, session_id, item_id)


@router.delete("/{session_id}", status_code=204, response_class=Response, responses=error_responses(401, 404, 503))
async def delete_session(session_id: str, tenant: TenantDep, services: ServicesDep) -> Response:
    await services.state.delete_session(tenant, session_id)
    return Response(status_code=204)
