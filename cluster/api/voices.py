"""/v1/voices: clone a voice from a reference clip (Mimi-encoded once, kept in Redis), list, get, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile

from cluster.api.errors import error_responses
from cluster.api.media import check_duration, media_type, read_body, replay
from cluster.api.schemas import VoiceForm, VoiceList, VoiceOut
from cluster.api.services import ServicesDep, TenantDep
from cluster.errors import UnsupportedMediaType
from model.errors import InvalidInput
from model.processing.audio import decode_audio

router = APIRouter(prefix="/v1/voices", tags=["voices"])

MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": VoiceForm.model_json_schema()}},
    }
}


@router.post(
    "", status_code=201, response_model=VoiceOut, openapi_extra=MULTIPART_BODY,
    responses=error_responses(400, 401, 413, 415, 422, 503),
)
async def create_voice(request: Request, tenant: TenantDep, services: ServicesDep) -> VoiceOut:
    """Clone a voice: a reference clip (WAV, FLAC or OGG, mono, up to 30 s) and its transcript."""
    if not media_type(request.headers.get("content-type"))[0].startswith("multipart/form-data"):
        raise UnsupportedMediaType("send the voice as multipart/form-data (audio, transcript, name)")
    body = await read_body(request, services.settings.max_body_bytes)
    async with Request(request.scope, replay(body)).form(max_files=1, max_fields=8, max_part_size=64 * 1024) as form:
        audio, transcript, name = form.get("audio"), form.get("transcript"), form.get("name")
        if not isinstance(audio, UploadFile):
            raise InvalidInput("multipart field 'audio' (a file) is missing")
        data = await audio.read()
    if not isinstance(transcript, str) or not transcript.strip():
        raise InvalidInput("multipart field 'transcript' is missing or empty")
    name = name if isinstance(name, str) and name.strip() else "voice"
    wave, rate = decode_audio(data)
    check_duration(wave, rate, services.settings.max_voice_audio_seconds, "voice audio")
    prompt = await services.backend.clone_voice(transcript, wave, rate)
    voice = await services.state.create_voice(
        tenant, name, transcript, prompt.transcript_ids.tolist(), prompt.codes.numpy(), prompt.valid_frames
    )
    return VoiceOut.of(voice)


@router.get("", response_model=VoiceList, responses=error_responses(401, 503))
async def list_voices(tenant: TenantDep, services: ServicesDep) -> VoiceList:
    return VoiceList(voices=[VoiceOut.of(v) for v in await services.state.list_voices(tenant)])


@router.get("/{voice_id}", response_model=VoiceOut, responses=error_responses(401, 404, 503))
async def get_voice(voice_id: str, tenant: TenantDep, services: ServicesDep) -> VoiceOut:
    return VoiceOut.of(await services.state.get_voice(tenant, voice_id))


@router.delete("/{voice_id}", status_code=204, response_class=Response, responses=error_responses(401, 404, 503))
async def delete_voice(voice_id: str, tenant: TenantDep, services: ServicesDep) -> Response:
    """Sessions that still name the voice stay; their next turn answers 404 for the voice."""
    await services.state.delete_voice(tenant, voice_id)
    return Response(status_code=204)
