"""/v1/sessions: a conversation in one voice (settings and turn history, in Redis with a TTL)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from cluster.api.errors import error_responses, validation_message
from cluster.api.media import read_body
from cluster.api.schemas import SessionCreate, SessionOut
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
    try:
        spec = SessionCreate.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc.errors())) from None
    return await services.state.create_session(tenant, spec.voice_id, spec.system_prompt, spec.output_format, spec.sampling)


@router.get("/{session_id}", response_model=SessionOut, responses=error_responses(401, 404, 503))
async def get_session(session_id: str, tenant: TenantDep, services: ServicesDep) -> SessionOut:
    return await services.state.get_session(tenant, session_id)


@router.delete("/{session_id}", status_code=204, response_class=Response, responses=error_responses(401, 404, 503))
async def delete_session(session_id: str, tenant: TenantDep, services: ServicesDep) -> Response:
    await services.state.delete_session(tenant, session_id)
    return Response(status_code=204)
