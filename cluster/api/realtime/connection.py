"""One `/v1/realtime` call: client events in, validated (cluster.api.realtime.events), to the `CallSession`;
`CallEvent`s out as server events."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid

import numpy as np
from fastapi import WebSocket
from pydantic import TypeAdapter, ValidationError

from cluster.api.errors import validation_message
from cluster.api.realtime import events as wire
from cluster.api.services import Services
from cluster.calls.audio import InboundAudio, LineFormat
from cluster.calls.events import (
    CallError,
    CallEvent,
    InputCleared,
    InputCommitted,
    ItemDeleted,
    ItemInfo,
    ItemTruncated,
    PlaybackStopped,
    ReplyAudio,
    ReplyCallEvent,
    ReplyFinished,
    ReplyStarted,
    ReplyText,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    TextItemAdded,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
    Usage,
)
from cluster.calls.session import CallSession
from cluster.calls.transport import BadMessage, CallTransport, ReplyEncoders
from cluster.calls.vad import TurnDetection
from cluster.state.history import Truncation
from model.errors import CallerError, ChromaError

log = logging.getLogger(__name__)

MODEL_NAME = "chroma-1.0"
TRUNCATION = TypeAdapter(Truncation)
ERROR_CODES = {"invalid_base64": "invalid_base64"}  # else invalid_event


class RealtimeCall:
    """One connection: a reader (client events -> the CallSession) and a writer (CallEvents -> server events)."""

    def __init__(self, websocket: WebSocket, services: Services, tenant: str):
        self.services = services
        self.settings = services.call_settings
        self.transport = CallTransport(websocket, self.settings.max_message_bytes)
        self.call = CallSession(tenant, services.state, services.backend, services.backend.processor, self.settings,
                                services.metrics, places=services.admission)
        self.input_format = self.output_format = LineFormat.PCM16_24K
        self.inbound = InboundAudio(self.input_format)
        self.encoders = ReplyEncoders()
        self.last_message_at = time.monotonic()
        self.call_id = f"call_{uuid.uuid4().hex}"
        self.transcription: wire.Transcription | None = None  # as the client set it, echoed

    async def run(self, session_id: str | None) -> None:
        if session_id is not None:
            try:
                await self.call.resume(session_id)
            except ChromaError as error:
                await self.transport.send(wire.Error.of(error.code, error.message))
                await self.transport.close(code=1008, reason=error.code)
                return
        await self.transport.send(wire.SessionCreated(session=self._session()))
        self.transport.tasks.spawn(self._write())
        self.transport.tasks.spawn(self._watch_limits())
        try:
            await self._read()
        finally:
            await self.transport.teardown(self.call)

    # ---- reading -----------------------------------------------------------------------------------------
    async def _read(self) -> None:
        while (message := await self.transport.receive()) is not None:
            self.last_message_at = time.monotonic()
            if isinstance(message, BadMessage):
                await self.transport.send(wire.Error.of(message.code, message.message))
            else:
                await self._handle(message)

    async def _handle(self, message: dict) -> None:
        event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
        try:
            event = wire.CLIENT_EVENT.validate_python(message)
            await self.HANDLERS[type(event)](self, event)
        except ValidationError as error:
            await self.transport.send(wire.Error.of(*_invalid(error, message), event_id))
        except ChromaError as error:
            await self.transport.send(wire.Error.of(error.code, error.message, event_id))
        except Exception:  # a bug of ours: the client hears of it, the call goes on, the log has the rest
            log.exception("realtime call: handling %.200r failed", message)
            await self.transport.send(wire.Error.of("server_error", "the event could not be handled", event_id))

    async def _session_update(self, event: wire.SessionUpdate) -> None:
        config = event.session
        if problem := config.unsupported():  # refused whole: nothing of the update is applied
            raise CallerError(problem, code="unsupported_session_field")
        audio_in, audio_out = config.audio.input, config.audio.output
        turn_detection = ("unchanged" if "turn_detection" not in audio_in.model_fields_set
                          else _turn_detection(audio_in.turn_detection, self.settings.early_start))
        transcription = audio_in.transcription if "transcription" in audio_in.model_fields_set else self.transcription
        await self.call.configure(instructions=config.instructions, voice_id=audio_out.voice,
                                  turn_detection=turn_detection, truncation=config.truncation,
                                  transcription=transcription is not None)
        self.transcription = transcription
        if audio_in.format is not None and wire.line_of(audio_in.format) is not self.input_format:
            self.input_format = wire.line_of(audio_in.format)
            self.inbound = InboundAudio(self.input_format)
        if audio_out.format is not None:
            self.output_format = wire.line_of(audio_out.format)
        await self.transport.send(wire.SessionUpdated(session=self._session()))

    async def _append(self, event: wire.InputAudioBufferAppend) -> None:
        await self.call.append_audio(self.inbound.decode(event.audio))

    async def _commit(self, event: wire.InputAudioBufferCommit) -> None:
        self.call.commit_input()
        if self.call.turn_detection is not None and self.call.turn_detection.create_response:
            await self.call.create_response()

    async def _clear(self, event: wire.InputAudioBufferClear) -> None:
        self.call.clear_input()

    async def _item_create(self, event: wire.ConversationItemCreate) -> None:
        item = event.item
        if item.role != "user":
            await self.call.add_text_message(item.role, item.text or "", item.id)
            return
        clips = [InboundAudio(self.input_format).decode(p.audio)
                 for p in item.content if p.type == "input_audio" and p.audio]
        self.call.add_user_message(item.text, np.concatenate(clips) if clips else None, item.id)

    async def _truncate(self, event: wire.ConversationItemTruncate) -> None:
        await self.call.truncate(event.item_id, event.audio_end_ms)

    async def _item_delete(self, event: wire.ConversationItemDelete) -> None:
        await self.call.delete_item(event.item_id)

    async def _item_retrieve(self, event: wire.ConversationItemRetrieve) -> None:
        item = self.call.find_item(event.item_id)
        if item is None:
            raise CallerError(f"no item {event.item_id!r} in this conversation", code="item_retrieve_invalid_item_id")
        await self.transport.send(wire.ItemRetrieved(item=_item(item)))

    async def _response_create(self, event: wire.ResponseCreate) -> None:
        await self.call.create_response(event.response.metadata)

    async def _response_cancel(self, event: wire.ResponseCancel) -> None:
        await self.call.cancel_response(event.response_id)

    async def _output_clear(self, event: wire.OutputAudioBufferClear) -> None:
        """Accepted: over a WebSocket the output audio buffer is the client's own (it stops playing, then truncates)."""

    HANDLERS = {
        wire.SessionUpdate: _session_update,
        wire.InputAudioBufferAppend: _append,
        wire.InputAudioBufferCommit: _commit,
        wire.InputAudioBufferClear: _clear,
        wire.ConversationItemCreate: _item_create,
        wire.ConversationItemTruncate: _truncate,
        wire.ConversationItemDelete: _item_delete,
        wire.ConversationItemRetrieve: _item_retrieve,
        wire.ResponseCreate: _response_create,
        wire.ResponseCancel: _response_cancel,
        wire.OutputAudioBufferClear: _output_clear,
    }

    # ---- writing -----------------------------------------------------------------------------------------
    async def _write(self) -> None:
        async for event in self.call.events():
            for message in self._server_events(event):
                await self.transport.send(message)

    def _server_events(self, event: CallEvent) -> list[wire._ServerEvent]:
        if isinstance(event, ReplyAudio):
            return self._audio(event, self.encoders.encode(event.reply_id, event.audio))
        if isinstance(event, ReplyText):
            return [wire.TranscriptDelta(**_part(event), delta=event.delta)]
        if isinstance(event, ReplyStarted):
            self.encoders.start(event.reply_id, self.output_format)
            return _reply_started(event)
        if isinstance(event, ReplyFinished):
            return [*self._audio(event, self.encoders.finish(event)), *_reply_finished(event)]
        if isinstance(event, SpeechStartedEvent):
            return [wire.SpeechStarted(audio_start_ms=event.audio_start_ms, item_id=event.item_id)]
        if isinstance(event, SpeechStoppedEvent):
            return [wire.SpeechStopped(audio_end_ms=event.audio_end_ms, item_id=event.item_id)]
        if isinstance(event, InputCommitted):
            item = _user_item(event.item_id, event.text)
            added = wire.ItemAdded(previous_item_id=event.previous_item_id, item=item)
            if event.from_buffer:
                return [wire.BufferCommitted(item_id=event.item_id, previous_item_id=event.previous_item_id), added]
            return [added, wire.ItemDone(item=item)]
        if isinstance(event, TextItemAdded):
            item = _text_item(event.item_id, event.role, event.text)
            return [wire.ItemAdded(previous_item_id=event.previous_item_id, item=item), wire.ItemDone(item=item)]
        if isinstance(event, InputCleared):
            return [wire.BufferCleared()]
        if isinstance(event, ItemDeleted):
            return [wire.ItemDeleted(item_id=event.item_id)]
        if isinstance(event, ItemTruncated):
            return [wire.ItemTruncated(item_id=event.item_id, audio_end_ms=event.audio_end_ms)]
        if isinstance(event, CallError):
            return [wire.Error.of(event.code, event.message, event.event_id)]
        if isinstance(event, TranscriptionDelta):
            return [wire.InputTranscriptionDelta(item_id=event.item_id, delta=event.delta)]
        if isinstance(event, TranscriptionCompleted):
            return [wire.InputTranscriptionCompleted(item_id=event.item_id, transcript=event.transcript,
                                                     usage=wire.TranscriptionUsage(seconds=round(event.audio_s, 3)))]
        if isinstance(event, TranscriptionFailed):
            return [wire.InputTranscriptionFailed(item_id=event.item_id,
                                                  error=wire.TranscriptionError(code=event.code, message=event.message))]
        if isinstance(event, PlaybackStopped):
            # The client stops its own playback on speech_started (it was sent just before this), then truncates.
            self.call.playback_stopped(event.reply_id)
            return []
        raise TypeError(f"no Realtime event for {type(event).__name__}")

    def _audio(self, event: ReplyCallEvent, data: bytes) -> list[wire._ServerEvent]:
        if not data:
            return []
        self.call.audio_sent(event.reply_id, len(data) / self.output_format.bytes_per_ms)
        return [wire.AudioDelta(**_part(event), delta=base64.b64encode(data).decode())]

    async def _watch_limits(self) -> None:
        """Idle timeout and maximum call duration: say why, then hang up."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now - self.last_message_at > self.settings.idle_timeout_s:
                code, message = "idle_timeout", f"no message for {self.settings.idle_timeout_s:g} s"
            elif now - started > self.settings.max_call_s:
                code, message = "call_too_long", f"the call reached its limit of {self.settings.max_call_s:g} s"
            else:
                continue
            await self.transport.send(wire.Error.of(code, message))
            await self.transport.close(code=1000, reason=code)
            return

    def _session(self) -> wire.SessionInfo:
        detection = self.call.turn_detection
        truncation = self.call.truncation or self.services.backend.history.settings.truncation
        return wire.SessionInfo(
            # The call's Redis session once it has one (it does once a voice is set): `?session_id=` resumes it.
            id=self.call.session.id if self.call.session else self.call_id, model=MODEL_NAME,
            instructions=self.call.instructions, truncation=TRUNCATION.dump_python(truncation, exclude_none=True),
            audio=wire.SessionAudio(
                input=wire.SessionAudioInput(format=wire.format_of(self.input_format),
                                             turn_detection=_turn_detection_out(detection),
                                             transcription=self.transcription),
                output=wire.SessionAudioOutput(format=wire.format_of(self.output_format),
                                               voice=self.call.voice.id if self.call.voice else None),
            ),
        )


def _invalid(error: ValidationError, message: dict) -> tuple[str, str]:
    """A client event that failed its model: the code clients match on, and what was wrong."""
    if not isinstance(message.get("type"), str):
        return "invalid_event", "an event is a JSON object with a string `type`"
    problems = [p for p in error.errors() if p["type"] != "union_tag_invalid" or p["loc"]]  # the event's own type
    if len(problems) < len(error.errors()):
        return "invalid_event_type", f"unknown event type {message['type']!r}"
    code = next((ERROR_CODES[p["type"]] for p in problems if p["type"] in ERROR_CODES), "invalid_event")
    return code, validation_message([{**p, "loc": p["loc"][1:]} for p in problems])  # past the event's own type


def _turn_detection(raw: dict | None, early_start: bool) -> TurnDetection | None:
    if raw is None:
        return None
    if raw.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
        raise CallerError(f"turn_detection {raw.get('type')!r} is not supported: use server_vad, semantic_vad or null",
                          code="invalid_turn_detection")
    known = {k: v for k, v in raw.items() if k in TurnDetection.model_fields}
    try:
        return TurnDetection.model_validate({"early_start": early_start, **known})
    except ValidationError as error:
        problem = validation_message(error.errors())
        raise CallerError(f"turn_detection: {problem}", code="invalid_turn_detection") from None


def _turn_detection_out(detection: TurnDetection | None) -> dict | None:
    """As the client set it: semantic_vad shows its own fields, not the silence window it maps to."""
    if detection is None:
        return None
    if detection.type == "semantic_vad":
        return detection.model_dump(include={"type", "eagerness", "create_response", "interrupt_response"})
    return detection.model_dump(exclude={"early_start", "eagerness"})


def _item(item: ItemInfo) -> wire.Item:
    status = "completed" if item.complete else "incomplete"
    if item.role != "user" and not item.audio:  # a system or assistant message the client created
        return _text_item(item.item_id, item.role, item.text or "")
    if item.role == "user":
        content = ([wire.InputText(text=item.text)] if item.text else []) + ([wire.InputAudio()] if item.audio else [])
        return wire.Item(id=item.item_id, role="user", status=status, content=content)
    return wire.Item(id=item.item_id, role="assistant", status=status,
                     content=[wire.OutputAudio(transcript=item.text or "")])


def _part(event: ReplyCallEvent) -> dict:
    return {"response_id": event.reply_id, "item_id": event.item_id}


def _user_item(item_id: str, text: str | None) -> wire.Item:
    content = [wire.InputText(text=text)] if text else [wire.InputAudio()]
    return wire.Item(id=item_id, role="user", status="completed", content=content)


def _text_item(item_id: str, role: str, text: str) -> wire.Item:
    part = wire.InputText(text=text) if role == "system" else wire.OutputText(text=text)
    return wire.Item(id=item_id, role=role, status="completed", content=[part])


def _assistant_item(event: ReplyCallEvent, status: str, transcript: str) -> wire.Item:
    return wire.Item(id=event.item_id, role="assistant", status=status,
                     content=[wire.OutputAudio(transcript=transcript)])


def _reply_started(event: ReplyStarted) -> list[wire._ServerEvent]:
    item = _assistant_item(event, "in_progress", "")
    return [
        wire.ResponseCreated(response=wire.Response(id=event.reply_id, status="in_progress", metadata=event.metadata)),
        wire.OutputItemAdded(response_id=event.reply_id, item=item),
        wire.ItemAdded(previous_item_id=event.previous_item_id, item=item),
        wire.ContentPartAdded(**_part(event), part=wire.AudioPart(transcript="")),
    ]


def _reply_finished(event: ReplyFinished) -> list[wire._ServerEvent]:
    item = _assistant_item(event, "completed" if event.outcome == "completed" else "incomplete", event.transcript)
    details = None
    if event.outcome == "failed":
        details = wire.StatusDetails(type="failed", reason=None, error=wire.ResponseError(code=event.reason))
    elif event.outcome == "cancelled":  # OpenAI's two reasons: the caller spoke, or the client (or its hang-up) did
        reason = "turn_detected" if event.reason == "turn_detected" else "client_cancelled"
        details = wire.StatusDetails(type="cancelled", reason=reason)
    return [
        wire.AudioDone(**_part(event)),
        wire.TranscriptDone(**_part(event), transcript=event.transcript),
        wire.ContentPartDone(**_part(event), part=wire.AudioPart(transcript=event.transcript)),
        wire.OutputItemDone(response_id=event.reply_id, item=item),
        wire.ItemDone(item=item),
        wire.ResponseDone(response=wire.Response(id=event.reply_id, status=event.outcome, status_details=details,
                                                 output=[item], metadata=event.metadata, usage=_usage(event.usage))),
    ]


def _usage(usage: Usage) -> wire.Usage:
    output = usage.text_tokens + usage.audio_frames
    return wire.Usage(
        total_tokens=usage.input_tokens + output, input_tokens=usage.input_tokens, output_tokens=output,
        input_token_details=wire.InputTokenDetails(cached_tokens=usage.cached_tokens, text_tokens=usage.input_tokens),
        output_token_details=wire.OutputTokenDetails(text_tokens=usage.text_tokens, audio_tokens=usage.audio_frames),
    )
