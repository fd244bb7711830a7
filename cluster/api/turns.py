"""POST /v1/sessions/{id}/turns: caller audio in, the spoken reply streamed out (SSE or raw audio).

A turn is admitted or refused once, as soon as its body is read, before its audio is decoded or anything runs
(`cluster.admission.control`: 429 over the tenant's quota, 503 at capacity or while a stage is down), so a refusal
costs no work. Then its prompt is planned (`cluster.pipeline.history`: the session's truncation drops the oldest
history that does not fit the Reasoner's context; 422 `utterance_too_long` for an utterance that does not fit by
itself, 409 `context_full` where the session disabled truncation); a turn refused by then releases its place.
The turn and its reply join the session's history atomically when the reply ends, with what the plan dropped; a
failed or abandoned turn leaves the session as it was. A reply that fails after it started
(a stage died) ends with an `error` event over SSE; a raw-audio body simply ends (the session's version says the
turn did not join the history).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from cluster.admission.control import Ticket
from cluster.api.errors import error_responses, request_id, stream_error
from cluster.api.media import caller_encoding, check_duration, negotiate_reply, read_body
from cluster.api.schemas import TurnDoneEvent
from cluster.api.services import Services, ServicesDep, TenantDep
from cluster.pipeline.history import TurnPlan, UserTurn
from cluster.pipeline.turn import AudioChunk, ReplyEvent, TextDelta, TurnDone
from cluster.state.store import Session
from model.errors import Conflict, InternalError, NotFound, StageUnavailable
from model.processing.audio import CODEC_RATE, REASONER_RATE, ReplyFormat, StreamingAudioEncoder, decode_audio
from model.processing.audio import resample

router = APIRouter(prefix="/v1/sessions", tags=["turns"])

_AUDIO_BODY = {"schema": {"type": "string", "format": "binary"}}
TURN_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "the caller's utterance, mono, up to 60 s: WAV/FLAC/OGG, raw PCM16 LE with its rate, or "
        "G.711 mu-law at 8 kHz",
        "content": {kind: _AUDIO_BODY for kind in ("audio/wav", "audio/flac", "audio/ogg", "audio/pcm;rate=16000",
                                                    "audio/basic")},
    }
}
TURN_RESPONSES = {
    200: {
        "description": "The reply, streamed as it is generated. `text/event-stream` sends events `text` "
        '(`{"delta"}`), `audio` (`{"format", "data": base64}` in the session\'s format), then `done` (TurnDoneEvent) '
        'or `error` (`{"error": {"code", "message", "request_id", "retryable"}}`, e.g. code `stage_failed` when a '
        "stage died mid-reply); the audio types send the raw audio as a chunked body, which just ends early when "
        "the reply fails (the session's version then shows the turn was not added).",
        "content": {
            "text/event-stream": {"schema": TurnDoneEvent.model_json_schema()},
            **{kind.media_type: _AUDIO_BODY for kind in ReplyFormat},
        },
    },
    **error_responses(400, 401, 404, 406, 409, 413, 415, 422, 429, 503),
}


@router.post("/{session_id}/turns", response_class=StreamingResponse, openapi_extra=TURN_OPENAPI,
             responses=TURN_RESPONSES)
async def create_turn(session_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> Response:
    """Answer the caller's utterance: the reply's text and audio stream as soon as the first frames decode."""
    received = time.perf_counter()
    encoding, rate = caller_encoding(request.headers.get("content-type"))
    body = await read_body(request, services.settings.max_body_bytes)
    session = await services.state.get_session(tenant, session_id)
    sse, reply_format = negotiate_reply(request.headers.get("accept"), session)
    # Admitted before the audio is decoded and the prompt planned: a refusal at capacity costs no work, so it is
    # answered at once however loaded the replica is.
    ticket = await services.admission.admit(tenant, "turn")
    try:
        wave, rate = decode_audio(body, sample_rate=rate, encoding=encoding)
        check_duration(wave, rate, services.settings.max_audio_seconds, "caller audio")
        voice, user_audio = await asyncio.gather(  # independent: overlap them
            services.state.get_voice(tenant, session.voice_id), asyncio.to_thread(resample, wave, rate, REASONER_RATE),
        )
        plan = services.backend.history.plan(session, UserTurn.of(_item_id(), user_audio))
    except BaseException:
        await ticket.release()
        raise
    turn = LiveTurn(services, tenant, session, plan, received, ticket, request_id(request))
    await turn.start(services.backend.run_turn(turn.id, voice, session, plan))
    writer = ReplyWriter(sse, reply_format)
    headers = {"Cache-Control": "no-cache", "X-Turn-Id": turn.id, "X-Accel-Buffering": "no"}
    return TurnResponse(turn.stream(writer), media_type=writer.media_type, headers=headers, on_close=turn.close)


class ReplyWriter:
    """The bytes of a streamed reply: server-sent events, or raw audio (which has no way to carry text or
    errors in-band: those return None)."""

    def __init__(self, sse: bool, reply_format: ReplyFormat):
        self.sse, self.format = sse, reply_format
        self.encoder = StreamingAudioEncoder(reply_format, CODEC_RATE)
        self.media_type = "text/event-stream" if sse else reply_format.media_type

    def text(self, delta: str) -> bytes | None:
        return _sse("text", {"delta": delta}) if self.sse and delta else None

    def audio(self, data: bytes) -> bytes | None:
        if not data:
            return None
        return _sse("audio", {"format": self.format.value, "data": base64.b64encode(data).decode()}) if self.sse else data

    def event(self, name: str, payload: dict) -> bytes | None:
        return _sse(name, payload) if self.sse else None


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class LiveTurn:
    """One admitted turn from its first reply event to the commit, with its metrics; it releases its ticket once
    committed, before its `done` event, and in any case when it ends, however it ends."""

    def __init__(
        self, services: Services, tenant: str, session: Session, plan: TurnPlan, received: float,
        ticket: Ticket, request_id: str,
    ):
        self.services, self.tenant, self.session = services, tenant, session
        self.plan, self.received = plan, received
        self.ticket, self.request_id = ticket, request_id
        self.id = f"turn_{uuid.uuid4().hex}"
        self.outcome = "cancelled"
        self.waiting = True
        self.first: ReplyEvent | None = None
        self.committed: Session | None = None
        self.events: AsyncIterator[ReplyEvent] | None = None
        services.metrics.live.inc()
        services.metrics.waiting.inc()

    async def start(self, events: AsyncIterator[ReplyEvent]) -> None:
        """Wait for the first event: a turn that fails before any reply is still a plain HTTP error. So is one
        whose reply has not started when a stage goes down, or within `start_timeout_s`: it is not left waiting
        for a replica to come back."""
        self.events = events
        try:
            self.first = await self._first_event(events)
            self.ticket.started()
            if isinstance(self.first, TurnDone):  # nothing to stream: commit before answering
                self.committed = await self.commit(self.first.text)
        except StopAsyncIteration:
            await self.close()
            raise InternalError("the backend ended the turn without a reply") from None
        except BaseException as error:
            self.outcome = "failed"
            self.services.admission.note_failure(error)
            await self.close()
            raise

    async def _first_event(self, events: AsyncIterator[ReplyEvent]) -> ReplyEvent:
        first = asyncio.ensure_future(anext(events))
        stage_down = asyncio.ensure_future(self.ticket.stage_down.wait())
        timeout = self.services.admission.settings.start_timeout_s
        try:
            await asyncio.wait({first, stage_down}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stage_down.cancel()
            if not first.done():
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
        if not first.cancelled():
            return first.result()
        if self.ticket.stage_down.is_set():
            self.services.admission.check_stages()  # names the stage that went down
            raise StageUnavailable("a stage went down before the reply started; retry shortly")
        raise StageUnavailable(f"the reply did not start within {timeout:g} s; retry shortly")

    async def commit(self, text: str) -> Session:
        plan, history = self.plan, self.services.backend.history
        committed = await self.services.state.append_turn(
            self.tenant, self.session.id, plan.user.audio, text, self.session.version, user_text=plan.user.text,
            ids=(plan.user.id, _item_id()), positions=(plan.user_positions, history.text_positions("assistant", text)),
            drop=plan.drop,
        )
        self.services.metrics.history_dropped.labels("messages").inc(len(plan.drop.messages))
        self.services.metrics.history_dropped.labels("caller_audio").inc(len(plan.drop.audio))
        return committed

    def _first_audio(self) -> float:
        """Time to first audio in ms, recorded once."""
        ttfa = time.perf_counter() - self.received
        self.services.metrics.ttfa.observe(ttfa)
        self.ticket.first_audio(ttfa)
        self.services.metrics.waiting.dec()
        self.waiting = False
        return round(1000 * ttfa, 1)

    async def stream(self, writer: ReplyWriter) -> AsyncIterator[bytes]:
        """The reply's bytes. A failure after the first byte ends the stream: with an `error` event over SSE, and
        simply ends a raw-audio body (it cannot carry errors); either way nothing joins the history."""
        try:
            async for data in self._reply(writer):
                yield data
        except Exception as error:
            self.outcome = "conflict" if isinstance(error, (Conflict, NotFound)) else "failed"
            self.services.admission.note_failure(error)
            body = stream_error(error, self.request_id)
            self.services.metrics.errors.labels(body.error.code).inc()
            if data := writer.event("error", body.model_dump()):
                yield data

    async def _reply(self, writer: ReplyWriter) -> AsyncIterator[bytes]:
        event, audio_samples, first_audio_ms = self.first, 0, None
        while not isinstance(event, TurnDone):
            if event is None:
                raise InternalError(f"turn {self.id}: the backend ended the reply without finishing it")
            if isinstance(event, TextDelta) and (data := writer.text(event.text)):
                yield data
            elif isinstance(event, AudioChunk):
                audio = np.asarray(event.audio, dtype=np.float32).reshape(-1)
                audio_samples += audio.size
                if data := writer.audio(writer.encoder.encode(audio)):
                    first_audio_ms = first_audio_ms or self._first_audio()
                    yield data
            event = await anext(self.events, None)
        if tail := writer.audio(writer.encoder.flush()):
            yield tail
        saved = self.committed or await self.commit(event.text)  # Conflict: another turn committed first
        done = self._done(event, saved, audio_samples, first_audio_ms)
        # The reply is made and committed: its place goes back before the caller hears it is done, so the caller's
        # next turn never finds its own last one still holding a place.
        await self.ticket.release()
        if writer.sse:
            yield writer.event("done", done.model_dump())

    def _done(self, event: TurnDone, saved: Session, audio_samples: int, first_audio_ms: float | None) -> TurnDoneEvent:
        seconds = audio_samples / CODEC_RATE
        rtf = (time.perf_counter() - self.received) / seconds if seconds else None
        metrics = self.services.metrics
        metrics.frames.inc(event.frames)
        if rtf is not None:
            metrics.rtf.observe(rtf)
        if event.prompt is not None:
            metrics.prompt_tokens.inc(event.prompt.prompt_tokens)
            metrics.cached_tokens.inc(event.prompt.cached_tokens)
        self.outcome = "completed"
        return TurnDoneEvent(
            turn_id=self.id, frames=event.frames, text=event.text, ttfa_ms=first_audio_ms,
            rtf=None if rtf is None else round(rtf, 4), audio_seconds=round(seconds, 4),
            session_version=saved.version, timings=event.timings,
            prompt_tokens=None if event.prompt is None else event.prompt.prompt_tokens,
            cached_tokens=None if event.prompt is None else event.prompt.cached_tokens,
            new_tokens=self.plan.new_positions, shipped_bytes=event.shipped, dropped=self.plan.drop.messages + self.plan.drop.audio,
        )

    async def close(self) -> None:
        if self.waiting:
            self.services.metrics.waiting.dec()
            self.waiting = False
        self.services.metrics.live.dec()
        self.services.metrics.turns.labels(self.outcome).inc()
        try:
            if self.events is not None:
                await self.events.aclose()
        finally:
            await self.ticket.release()


def _item_id() -> str:
    return f"item_{uuid.uuid4().hex[:24]}"


class TurnResponse(StreamingResponse):
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
