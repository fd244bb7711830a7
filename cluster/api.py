"""The public HTTP API as a plain Starlette app (no Ray here: a Ray Serve ingress mounts `build_api`'s app).

Every request but /healthz, /readyz and /metrics names its tenant with `Authorization: Bearer <key>` or
`X-API-Key: <key>`. Errors are JSON everywhere: `{"error": {"code": "...", "message": "..."}}`.

    POST   /v1/voices                  multipart: audio (file), transcript, name -> 201 Voice
    GET    /v1/voices                  {"voices": [Voice, ...]}
    GET    /v1/voices/{id}             Voice
    DELETE /v1/voices/{id}             204
    POST   /v1/sessions                JSON {voice_id, system_prompt?, output_format?, sampling?} -> 201 Session
    GET    /v1/sessions/{id}           Session
    DELETE /v1/sessions/{id}           204
    POST   /v1/sessions/{id}/turns     body: caller audio; reply streamed (see `turn`)
    GET    /healthz  /readyz  /metrics

The model work sits behind `TurnBackend`: `cluster.local_backend.LocalTurnBackend` in one process, the Ray
deployments in the cluster.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anyio
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cluster.state import NotFound, Session, SessionSampling, StateStore, TenantDirectory, Voice, VersionConflict
from model.audio import AudioError, ReplyFormat, StreamingAudioEncoder, decode_audio, resample
from model.codec_engine import CodecCapacityError
from model.speech_engine import CapacityError

log = logging.getLogger(__name__)

REPLY_RATE = 24000  # the codec's rate: every AudioChunk a backend yields is float32 at this rate
CALLER_RATE = 16000  # the thinker's input rate; caller audio is stored and handed on at this rate


# ---- the backend the app drives -------------------------------------------------------------------------
@dataclass
class TextDelta:
    text: str


@dataclass
class AudioChunk:
    audio: np.ndarray  # float32 mono at REPLY_RATE


@dataclass
class TurnDone:
    frames: int
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)


ReplyEvent = TextDelta | AudioChunk | TurnDone


@runtime_checkable
class TurnBackend(Protocol):
    async def encode_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> tuple[list[int], np.ndarray, int]:
        """-> (transcript ids, Mimi codes [F, 8], valid frames). ValueError/AudioError for unusable input."""
        ...

    def run_turn(
        self, turn_id: str, voice: Voice, session: Session, history_audio: list[bytes | None],
        user_audio_16k: np.ndarray, *, max_tokens: int | None = None, max_frames: int | None = None,
    ) -> AsyncIterator[ReplyEvent]:
        """Text deltas and audio chunks as they are produced, then exactly one TurnDone. `history_audio` is
        `StateStore.load_history_audio(session)` (16 kHz PCM16 per user turn). Closing the iterator cancels the
        turn and frees its engine slots. CapacityError when full; ValueError for a conversation it cannot take."""
        ...

    async def ready(self) -> bool:
        ...


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHROMA_API_")

    max_body_bytes: int = Field(10 * 2**20, ge=1)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_voice_audio_seconds: float = Field(30.0, gt=0)
    max_reply_tokens: int = Field(256, ge=1)
    max_reply_frames: int | None = Field(None, ge=1, description="None: the backend's own limit")
    retry_after_s: int = Field(1, ge=0)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class SessionCreate(BaseModel):
    model_config = {"extra": "forbid"}

    voice_id: str
    system_prompt: str = ""
    output_format: ReplyFormat = ReplyFormat.PCM16_24K
    sampling: SessionSampling = Field(default_factory=SessionSampling)


# ---- metrics --------------------------------------------------------------------------------------------
class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttfa = Histogram(
            "chroma_turn_ttfa_seconds", "Request received to first reply audio sent", registry=self.registry,
            buckets=(0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
        )
        self.rtf = Histogram(
            "chroma_turn_rtf", "Turn wall time / reply audio duration", registry=self.registry,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0),
        )
        self.live = Gauge("chroma_live_turns", "Turns streaming now", registry=self.registry)
        self.waiting = Gauge(
            "chroma_turns_waiting", "Queue depth: turns accepted that have not sent their first audio yet",
            registry=self.registry,
        )
        self.frames = Counter("chroma_frames", "Reply audio frames generated (12.5 per second)", registry=self.registry)
        self.turns = Counter("chroma_turns", "Turns by outcome", ["outcome"], registry=self.registry)
        self.errors = Counter("chroma_errors", "Error responses and failed streams by kind", ["kind"], registry=self.registry)


# ---- request helpers ------------------------------------------------------------------------------------
def _media_type(header: str | None) -> tuple[str, dict[str, str]]:
    if not header:
        return "", {}
    kind, *params = (p.strip() for p in header.split(";"))
    parsed = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            parsed[k.strip().lower()] = v.strip().strip('"')
    return kind.lower(), parsed


_CONTAINER_TYPES = {
    "audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/flac", "audio/x-flac", "audio/ogg",
    "application/ogg", "application/octet-stream",
}


def caller_encoding(content_type: str | None) -> tuple[str | None, int | None]:
    """Content-Type of a turn body -> (decode_audio encoding, sample rate). None (no header, a container type)
    means the container is sniffed from the bytes (WAV, FLAC, OGG)."""
    kind, params = _media_type(content_type)
    rate = params.get("rate")
    if rate is not None:
        try:
            rate = int(rate)
        except ValueError:
            raise ApiError(422, "invalid_content_type", f"rate parameter {params['rate']!r} is not an integer") from None
    if not kind or kind in _CONTAINER_TYPES:
        return None, None  # the container header gives the rate
    if kind in ("audio/pcm", "audio/x-pcm", "audio/pcm16"):
        if rate is None:
            raise ApiError(422, "invalid_content_type", f"{kind} needs a rate parameter, e.g. '{kind};rate=16000'")
        return "pcm16", rate
    if kind in ("audio/basic", "audio/pcmu", "audio/x-mulaw", "audio/mulaw"):
        return "mulaw", rate or 8000
    raise ApiError(
        415, "unsupported_media_type",
        f"unsupported caller audio type {kind!r}: send audio/wav (or FLAC/OGG), audio/pcm;rate=N or audio/basic",
    )


def negotiate_reply(accept: str | None, session: Session) -> tuple[bool, ReplyFormat]:
    """Accept header -> (server-sent events?, audio format). SSE carries the session's output_format."""
    if not accept:
        return True, session.output_format
    ranges = []
    for n, item in enumerate(accept.split(",")):
        kind, params = _media_type(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append((-q, n, kind, params))
    for _, _, kind, params in sorted(ranges):
        if kind in ("text/event-stream", "*/*", "text/*"):
            return True, session.output_format
        if kind in ("audio/pcm", "audio/x-pcm", "audio/pcm16"):
            rate = params.get("rate", "24000")
            if rate in ("24000", "16000"):
                return False, ReplyFormat.PCM16_24K if rate == "24000" else ReplyFormat.PCM16_16K
        if kind in ("audio/basic", "audio/pcmu", "audio/x-mulaw", "audio/mulaw"):
            return False, ReplyFormat.MULAW_8K
        if kind in ("audio/wav", "audio/x-wav", "audio/wave"):
            return False, ReplyFormat.WAV
        if kind == "audio/*":
            return False, session.output_format
    raise ApiError(
        406, "not_acceptable",
        "no acceptable reply type: accept text/event-stream, audio/pcm;rate=24000, audio/pcm;rate=16000, "
        "audio/basic or audio/wav",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes: by Content-Length first, then by counting."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_request", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is {size} bytes; the limit is {limit} bytes")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away while sending the body") from None
    return b"".join(chunks)


def _replay(body: bytes) -> Callable:
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _check_duration(wave: np.ndarray, rate: int, limit: float, what: str) -> None:
    seconds = wave.size / rate
    if seconds > limit:
        raise ApiError(413, "audio_too_long", f"{what} is {seconds:.1f} s long; the limit is {limit:g} s")


def _pcm16(wave: np.ndarray) -> bytes:
    return np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def voice_json(voice: Voice) -> dict:
    return voice.model_dump(mode="json", exclude={"transcript_ids"})


def session_json(session: Session) -> dict:
    return session.model_dump(mode="json")


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _TurnResponse(StreamingResponse):
    """Runs `on_close` however the response ends (finished, failed, client gone, or never started)."""

    def __init__(self, *args, on_close: Callable, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


# ---- the app --------------------------------------------------------------------------------------------
def build_api(state: StateStore, tenants: TenantDirectory, backend: TurnBackend, settings: ApiSettings | None = None) -> Starlette:
    settings = settings or ApiSettings()
    metrics = ApiMetrics()

    def tenant_of(request: Request) -> str:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                key = token.strip()
        tenant = tenants.tenant_for(key)
        if tenant is None:
            raise ApiError(401, "unauthorized", "missing or unknown API key (send 'Authorization: Bearer <key>')",
                           headers={"WWW-Authenticate": "Bearer"})
        return tenant

    # voices
    async def create_voice(request: Request) -> Response:
        tenant = tenant_of(request)
        if not _media_type(request.headers.get("content-type"))[0].startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type", "send the voice as multipart/form-data (audio, transcript, name)")
        body = await read_body(request, settings.max_body_bytes)
        replay = Request(request.scope, _replay(body))
        async with replay.form(max_files=1, max_fields=8, max_part_size=64 * 1024) as form:
            audio, transcript, name = form.get("audio"), form.get("transcript"), form.get("name")
            if not isinstance(audio, UploadFile):
                raise ApiError(422, "invalid_request", "multipart field 'audio' (a file) is missing")
            data = await audio.read()
        if not isinstance(transcript, str) or not transcript.strip():
            raise ApiError(422, "invalid_request", "multipart field 'transcript' is missing or empty")
        name = name if isinstance(name, str) and name.strip() else "voice"
        wave, rate = decode_audio(data)
        _check_duration(wave, rate, settings.max_voice_audio_seconds, "voice audio")
        ids, codes, valid_frames = await backend.encode_voice(transcript, wave, rate)
        voice = await state.create_voice(tenant, name, transcript, ids, codes, valid_frames)
        return JSONResponse(voice_json(voice), status_code=201)

    async def list_voices(request: Request) -> Response:
        voices = await state.list_voices(tenant_of(request))
        return JSONResponse({"voices": [voice_json(v) for v in voices]})

    async def voice(request: Request) -> Response:
        tenant, voice_id = tenant_of(request), request.path_params["voice_id"]
        if request.method == "DELETE":
            await state.delete_voice(tenant, voice_id)
            return Response(status_code=204)
        return JSONResponse(voice_json(await state.get_voice(tenant, voice_id)))

    # sessions
    async def create_session(request: Request) -> Response:
        tenant = tenant_of(request)
        body = await read_body(request, settings.max_body_bytes)
        try:
            spec = SessionCreate.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", _validation_message(exc)) from None
        session = await state.create_session(tenant, spec.voice_id, spec.system_prompt, spec.output_format, spec.sampling)
        return JSONResponse(session_json(session), status_code=201)

    async def session(request: Request) -> Response:
        tenant, session_id = tenant_of(request), request.path_params["session_id"]
        if request.method == "DELETE":
            await state.delete_session(tenant, session_id)
            return Response(status_code=204)
        return JSONResponse(session_json(await state.get_session(tenant, session_id)))

    # turns
    async def turn(request: Request) -> Response:
        received = time.perf_counter()
        tenant, session_id = tenant_of(request), request.path_params["session_id"]
        encoding, rate = caller_encoding(request.headers.get("content-type"))
        body = await read_body(request, settings.max_body_bytes)
        wave, rate = decode_audio(body, sample_rate=rate, encoding=encoding)
        _check_duration(wave, rate, settings.max_audio_seconds, "caller audio")
        session = await state.get_session(tenant, session_id)
        sse, reply_format = negotiate_reply(request.headers.get("accept"), session)
        voice, history_audio, user_16k = await asyncio.gather(  # independent: overlap them, TTFA counts from here
            state.get_voice(tenant, session.voice_id), state.load_history_audio(session),
            asyncio.to_thread(resample, wave, rate, CALLER_RATE),
        )

        turn_id = f"turn_{uuid.uuid4().hex}"
        events = backend.run_turn(
            turn_id, voice, session, history_audio, user_16k,
            max_tokens=settings.max_reply_tokens, max_frames=settings.max_reply_frames,
        )
        metrics.live.inc()
        metrics.waiting.inc()
        outcome = "cancelled"
        waiting = True

        def stop_waiting() -> None:
            nonlocal waiting
            if waiting:
                metrics.waiting.dec()
                waiting = False

        async def close() -> None:
            stop_waiting()
            metrics.live.dec()
            metrics.turns.labels(outcome).inc()
            await events.aclose()

        try:
            first = await anext(events)
        except StopAsyncIteration:
            await close()
            raise RuntimeError("the backend ended the turn without a reply") from None
        except BaseException:
            outcome = "failed"
            await close()
            raise

        encoder = StreamingAudioEncoder(reply_format, REPLY_RATE)

        async def commit(text: str) -> Session:
            return await state.append_turn(tenant, session_id, _pcm16(user_16k), text, session.version)

        if isinstance(first, TurnDone):  # nothing streamed yet: failures are still plain HTTP errors
            try:
                committed = await commit(first.text)
            except BaseException:
                outcome = "failed"
                await close()
                raise

        async def stream() -> AsyncIterator[bytes]:
            nonlocal outcome
            first_audio_at = None
            audio_samples = 0
            event = first
            pending = [first]
            while True:
                event = pending.pop() if pending else await anext(events, None)
                if event is None:
                    outcome = "failed"
                    metrics.errors.labels("backend").inc()
                    if not sse:
                        raise RuntimeError(f"turn {turn_id}: the backend ended the reply without finishing it")
                    yield _sse("error", {"error": {"code": "backend_error", "message": "the reply ended early"}})
                    return
                if isinstance(event, TextDelta):
                    if sse and event.text:
                        yield _sse("text", {"delta": event.text})
                    continue
                if isinstance(event, AudioChunk):
                    audio = np.asarray(event.audio, dtype=np.float32).reshape(-1)
                    audio_samples += audio.size
                    data = encoder.encode(audio)
                    if data:
                        if first_audio_at is None:
                            first_audio_at = time.perf_counter()
                            metrics.ttfa.observe(first_audio_at - received)
                            stop_waiting()
                        yield _sse("audio", {"format": reply_format.value, "data": base64.b64encode(data).decode()}) if sse else data
                    continue
                break  # TurnDone
            tail = encoder.flush()
            if tail:
                yield _sse("audio", {"format": reply_format.value, "data": base64.b64encode(tail).decode()}) if sse else tail
            try:
                saved = committed if event is first else await commit(event.text)
            except (VersionConflict, NotFound) as exc:
                outcome = "conflict"
                metrics.errors.labels("version_conflict" if isinstance(exc, VersionConflict) else "not_found").inc()
                if not sse:
                    # Raw audio has no way to say so in-band: the stream is cut off, so the client sees it fail.
                    raise
                code = "version_conflict" if isinstance(exc, VersionConflict) else "not_found"
                yield _sse("error", {"error": {"code": code, "message": str(exc)}})
                return
            elapsed = time.perf_counter() - received
            seconds = audio_samples / REPLY_RATE
            rtf = elapsed / seconds if seconds else None
            metrics.frames.inc(event.frames)
            if rtf is not None:
                metrics.rtf.observe(rtf)
            outcome = "completed"
            if sse:
                ttfa_ms = None if first_audio_at is None else round(1000 * (first_audio_at - received), 1)
                yield _sse("done", {
                    "turn_id": turn_id, "frames": event.frames, "text": event.text, "ttfa_ms": ttfa_ms,
                    "rtf": None if rtf is None else round(rtf, 4), "audio_seconds": round(seconds, 4),
                    "session_version": saved.version, "timings": event.timings,
                })

        media_type = "text/event-stream" if sse else reply_format.media_type
        headers = {"Cache-Control": "no-cache", "X-Turn-Id": turn_id, "X-Accel-Buffering": "no"}
        return _TurnResponse(stream(), media_type=media_type, headers=headers, on_close=close)

    # health
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = []
        try:
            with anyio.fail_after(2.0):
                await state.redis.ping()
        except Exception as exc:
            problems.append(f"redis: {type(exc).__name__}: {exc}")
        try:
            ready = getattr(backend, "ready", None)
            if ready is not None and not await ready():
                problems.append("backend: not ready")
        except Exception as exc:
            problems.append(f"backend: {type(exc).__name__}: {exc}")
        if problems:
            return error_response(503, "not_ready", "; ".join(problems))
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # errors
    def handler(status: int, code: str, kind: str, headers: Callable[[], dict] | None = None):
        async def handle(request: Request, exc: Exception) -> Response:
            metrics.errors.labels(kind).inc()
            return error_response(status, code, str(exc), headers() if headers else None)

        return handle

    async def api_error(request: Request, exc: ApiError) -> Response:
        metrics.errors.labels(exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        metrics.errors.labels(f"http_{exc.status_code}").inc()
        code = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        metrics.errors.labels("internal").inc()
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")

    retry = lambda: {"Retry-After": str(settings.retry_after_s)}  # noqa: E731
    exception_handlers = {
        ApiError: api_error,
        HTTPException: http_error,
        NotFound: handler(404, "not_found", "not_found"),
        VersionConflict: handler(409, "version_conflict", "version_conflict"),
        CapacityError: handler(503, "over_capacity", "capacity", retry),
        CodecCapacityError: handler(503, "over_capacity", "capacity", retry),
        RedisError: handler(503, "state_unavailable", "redis", retry),  # Redis down or restarting: retry shortly
        AudioError: handler(422, "invalid_audio", "invalid_audio"),
        ValueError: handler(422, "invalid_request", "invalid_request"),
        Exception: internal_error,
    }
    routes = [
        Route("/v1/voices", create_voice, methods=["POST"]),
        Route("/v1/voices", list_voices, methods=["GET"]),
        Route("/v1/voices/{voice_id}", voice, methods=["GET", "DELETE"]),
        Route("/v1/sessions", create_session, methods=["POST"]),
        Route("/v1/sessions/{session_id}", session, methods=["GET", "DELETE"]),
        Route("/v1/sessions/{session_id}/turns", turn, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers=exception_handlers)
    app.state.metrics = metrics
    app.state.settings = settings
    return app


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
