"""`/v1/realtime`: live calls over the OpenAI Realtime (GA) WebSocket protocol, on `CallSession`.

The official `openai` SDK, pipecat's and LiveKit's OpenAI-realtime services connect by changing only their base
URL. `Authorization: Bearer <key>` on the handshake names the tenant; `?session_id=` resumes a session (its voice,
instructions and history), so a dropped connection can reconnect and go on. Every message is one JSON text frame.

Client events: session.update, input_audio_buffer.append|commit|clear, conversation.item.create (a user
message: input_text / input_audio), conversation.item.truncate, conversation.item.delete, response.create,
response.cancel. Server events use the GA names (response.output_audio.delta, ...); the beta spellings are
accepted on input (input_audio_format, turn_detection and voice at the session's top level). Anything malformed
or out of order gets an `error` event with a code, and the call goes on.

A long call: `session.truncation` ("auto", "disabled" or {"type": "retention_ratio", ...}, GA semantics) says
what happens when the conversation outgrows the Reasoner's context. Items that truncation drops are gone from
the conversation, and the client hears `conversation.item.deleted` for each, as for an item it deletes itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cluster.api.errors import http_status, validation_message
from cluster.api.services import Services
from cluster.calls.audio import InboundAudio, LineFormat, OutboundAudio
from cluster.calls.session import (
    CallError,
    CallEvent,
    CallSession,
    InputCleared,
    InputCommitted,
    ItemDeleted,
    ItemTruncated,
    PlaybackStopped,
    Reply,
    ReplyAudio,
    ReplyFinished,
    ReplyStarted,
    ReplyText,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from cluster.calls.vad import TurnDetection
from cluster.errors import Unauthorized
from cluster.state.history import Truncation
from model.errors import CallerError, ChromaError

log = logging.getLogger(__name__)

router = APIRouter()

MODEL_NAME = "chroma-1.0"
TRUNCATION = TypeAdapter(Truncation)


# ---- client events --------------------------------------------------------------------------------------
class _Lenient(BaseModel):
    # Clients send fields we do not use (tools, tracing, ...): accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class AudioFormat(_Lenient):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
    rate: Literal[24000] | None = None

    def line(self) -> LineFormat:
        return {"audio/pcm": LineFormat.PCM16_24K, "audio/pcmu": LineFormat.PCMU, "audio/pcma": LineFormat.PCMA}[self.type]


BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


class AudioInput(_Lenient):
    format: AudioFormat | None = None
    turn_detection: dict | None = Field(default_factory=lambda: {"unchanged": True})


class AudioOutput(_Lenient):
    format: AudioFormat | None = None
    voice: str | None = None


class AudioConfig(_Lenient):
    input: AudioInput = Field(default_factory=AudioInput)
    output: AudioOutput = Field(default_factory=AudioOutput)


class SessionConfig(_Lenient):
    instructions: str | None = None
    audio: AudioConfig = Field(default_factory=AudioConfig)
    truncation: Truncation | None = None

    @classmethod
    def parse(cls, raw: Any) -> SessionConfig:
        """GA shape, with the beta spellings at the top level folded in."""
        raw = _object(raw, "session")
        audio = _object(raw.get("audio") or {}, "session.audio")
        audio_in = _object(audio.get("input") or {}, "session.audio.input")
        audio_out = _object(audio.get("output") or {}, "session.audio.output")
        for beta, target in (("input_audio_format", audio_in), ("output_audio_format", audio_out)):
            if beta in raw:
                name = raw[beta]
                target["format"] = {"type": BETA_FORMATS.get(name, name) if isinstance(name, str) else name}
        if "turn_detection" in raw:
            audio_in["turn_detection"] = raw["turn_detection"]
        if "voice" in raw:
            audio_out["voice"] = raw["voice"]
        raw["audio"] = {"input": audio_in, "output": audio_out}
        return cls.model_validate(raw)


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    audio: str | None = None


class Item(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user"]
    content: list[ContentPart] = Field(min_length=1)


# ---- the connection --------------------------------------------------------------------------------------
@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, session_id: str | None = None) -> None:
    services: Services = websocket.app.state.services
    tenant = services.tenants.tenant_for(_bearer(websocket.headers.get("authorization")))
    if tenant is None:
        await _refuse(websocket, services, Unauthorized("missing or unknown API key (send 'Authorization: Bearer <key>')"))
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
    await websocket.send_text(json.dumps(_error_event(refusal.code, refusal.message)))
    await websocket.close(code=1008 if status == 401 else 1013, reason=refusal.code)


class RealtimeCall:
    """One connection: a reader (client events -> the CallSession) and a writer (CallEvents -> server events)."""

    def __init__(self, websocket: WebSocket, services: Services, tenant: str):
        self.websocket, self.services = websocket, services
        self.settings = services.call_settings
        self.call = CallSession(tenant, services.state, services.backend, services.backend.processor, self.settings,
                                services.metrics, places=services.admission)
        self.input_format = self.output_format = LineFormat.PCM16_24K
        self.inbound = InboundAudio(self.input_format)
        self.outbound: dict[str, OutboundAudio] = {}  # per reply id
        self.last_message_at = time.monotonic()
        self.call_id = f"call_{uuid.uuid4().hex}"

    async def run(self, session_id: str | None) -> None:
        if session_id is not None:
            try:
                await self.call.resume(session_id)
            except ChromaError as error:
                await self._send(_error_event(error.code, error.message))
                await self.websocket.close(code=1008, reason=error.code)
                return
        await self._send({"type": "session.created", "session": self._session()})
        writer = asyncio.create_task(self._write())
        watchdog = asyncio.create_task(self._watch_limits())
        try:
            await self._read()
        finally:
            watchdog.cancel()
            await self.call.close()  # frees every slot, commits what was heard
            await _quietly(writer)
            with contextlib.suppress(Exception):
                await self.websocket.close()

    # ---- reading -----------------------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            self.last_message_at = time.monotonic()
            text = message.get("text")
            if text is None:
                await self._send(_error_event("invalid_event", "binary frames are not part of this protocol: send JSON text"))
                continue
            if len(text) > self.settings.max_message_bytes:
                await self._send(_error_event(
                    "message_too_large", f"a message may hold at most {self.settings.max_message_bytes} bytes"))
                continue
            await self._handle(text)

    async def _handle(self, text: str) -> None:
        event_id = None
        try:
            event = json.loads(text)
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise CallerError("an event is a JSON object with a string `type`", code="invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = self.HANDLERS.get(event["type"])
            if handler is None:
                raise CallerError(f"unknown event type {event['type']!r}", code="invalid_event_type")
            await handler(self, event)
        except json.JSONDecodeError as error:
            await self._send(_error_event("invalid_json", f"the message is not JSON: {error.msg} at {error.pos}"))
        except ValidationError as error:
            await self._send(_error_event("invalid_event", validation_message(error.errors()), event_id))
        except ChromaError as error:
            await self._send(_error_event(error.code, error.message, event_id))
        except Exception:  # a bug of ours: the client hears of it, the call goes on, the log has the rest
            log.exception("realtime call: handling %.200r failed", text)
            await self._send(_error_event("server_error", "the event could not be handled", event_id))

    async def _session_update(self, event: dict) -> None:
        config = SessionConfig.parse(event.get("session"))
        detection = config.audio.input.turn_detection
        turn_detection = "unchanged" if detection == {"unchanged": True} else _turn_detection(detection, self.settings.early_start)
        await self.call.configure(instructions=config.instructions, voice_id=config.audio.output.voice,
                                  turn_detection=turn_detection, truncation=config.truncation)
        if config.audio.input.format is not None and config.audio.input.format.line() is not self.input_format:
            self.input_format = config.audio.input.format.line()
            self.inbound = InboundAudio(self.input_format)
        if config.audio.output.format is not None:
            self.output_format = config.audio.output.format.line()
        await self._send({"type": "session.updated", "session": self._session()})

    async def _append(self, event: dict) -> None:
        audio = self.inbound.decode(_base64(event.get("audio"), "audio"))
        await self.call.append_audio(audio)

    async def _commit(self, event: dict) -> None:
        self.call.commit_input()
        if self.call.turn_detection is not None and self.call.turn_detection.create_response:
            await self.call.create_response()

    async def _clear(self, event: dict) -> None:
        self.call.clear_input()

    async def _item_create(self, event: dict) -> None:
        item = Item.model_validate(event.get("item"))
        text = " ".join(p.text for p in item.content if p.type == "input_text" and p.text) or None
        clips = [InboundAudio(self.input_format).decode(_base64(p.audio, "item.content.audio"))
                 for p in item.content if p.type == "input_audio" and p.audio]
        audio = np.concatenate(clips) if clips else None
        item_id = self.call.add_user_message(text, audio)
        await self._send({"type": "conversation.item.added", "item": _user_item(item_id, text, "completed")})
        await self._send({"type": "conversation.item.done", "item": _user_item(item_id, text, "completed")})

    async def _truncate(self, event: dict) -> None:
        item_id, audio_end_ms = event.get("item_id"), event.get("audio_end_ms")
        if not isinstance(item_id, str) or not isinstance(audio_end_ms, int) or isinstance(audio_end_ms, bool):
            raise CallerError("conversation.item.truncate needs item_id (string) and audio_end_ms (integer)",
                              code="invalid_event")
        if event.get("content_index", 0) != 0:
            raise CallerError("only content_index 0 (the item's audio) can be truncated", code="invalid_event")
        await self.call.truncate(item_id, audio_end_ms)

    async def _item_delete(self, event: dict) -> None:
        item_id = event.get("item_id")
        if not isinstance(item_id, str):
            raise CallerError("conversation.item.delete needs item_id (string)", code="invalid_event")
        await self.call.delete_item(item_id)

    async def _response_create(self, event: dict) -> None:
        await self.call.create_response()

    async def _response_cancel(self, event: dict) -> None:
        response_id = event.get("response_id")
        await self.call.cancel_response(response_id if isinstance(response_id, str) else None)

    HANDLERS = {
        "session.update": _session_update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
        "conversation.item.create": _item_create,
        "conversation.item.truncate": _truncate,
        "conversation.item.delete": _item_delete,
        "response.create": _response_create,
        "response.cancel": _response_cancel,
    }

    # ---- writing -----------------------------------------------------------------------------------------
    async def _write(self) -> None:
        async for event in self.call.events():
            for message in self._server_events(event):
                await self._send(message)

    def _server_events(self, event: CallEvent) -> list[dict]:
        if isinstance(event, ReplyAudio):
            return self._audio_events(event.reply, self.outbound[event.reply.id].encode(event.audio))
        if isinstance(event, ReplyText):
            return [{"type": "response.output_audio_transcript.delta", **_part_of(event.reply), "delta": event.delta}]
        if isinstance(event, ReplyStarted):
            self.outbound[event.reply.id] = OutboundAudio(self.output_format)
            return _reply_started(event.reply)
        if isinstance(event, ReplyFinished):
            tail = self.outbound.pop(event.reply.id).flush()
            return [*self._audio_events(event.reply, tail), *_reply_finished(event.reply)]
        if isinstance(event, SpeechStartedEvent):
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": event.audio_start_ms,
                     "item_id": event.item_id}]
        if isinstance(event, SpeechStoppedEvent):
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": event.audio_end_ms,
                     "item_id": event.item_id}]
        if isinstance(event, InputCommitted):
            committed = {"type": "input_audio_buffer.committed", "item_id": event.item_id,
                         "previous_item_id": event.previous_item_id}
            return [] if event.text is not None else [committed, {
                "type": "conversation.item.added", "previous_item_id": event.previous_item_id,
                "item": _user_item(event.item_id, None, "completed")}]
        if isinstance(event, InputCleared):
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(event, ItemDeleted):
            return [{"type": "conversation.item.deleted", "item_id": event.item_id}]
        if isinstance(event, ItemTruncated):
            return [{"type": "conversation.item.truncated", "item_id": event.item_id, "content_index": 0,
                     "audio_end_ms": event.audio_end_ms}]
        if isinstance(event, CallError):
            return [_error_event(event.code, event.message, event.event_id)]
        if isinstance(event, PlaybackStopped):
            event.reply.cursor.stopped.set()  # the client stops its own playback on speech_started, then truncates
            return []
        raise TypeError(f"no Realtime event for {type(event).__name__}")

    def _audio_events(self, reply: Reply, data: bytes) -> list[dict]:
        if not data:
            return []
        self.call.audio_sent(reply, len(data) / self.output_format.bytes_per_ms)
        return [{"type": "response.output_audio.delta", **_part_of(reply), "delta": base64.b64encode(data).decode()}]

    async def _send(self, event: dict) -> None:
        event.setdefault("event_id", f"event_{uuid.uuid4().hex[:20]}")
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # gone: the reader ends the call
            await self.websocket.send_text(json.dumps(event, separators=(",", ":")))

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
            await self._send(_error_event(code, message))
            with contextlib.suppress(Exception):
                await self.websocket.close(code=1000, reason=code)
            return

    def _session(self) -> dict:
        detection = self.call.turn_detection
        return {
            # The call's Redis session once it has one (it does once a voice is set): `?session_id=` resumes it.
            "type": "realtime", "id": self.call.session.id if self.call.session else self.call_id,
            "object": "realtime.session", "model": MODEL_NAME,
            "output_modalities": ["audio"], "instructions": self.call.instructions,
            "truncation": TRUNCATION.dump_python(self.call.truncation or self.services.backend.history.settings.truncation,
                                                 exclude_none=True),
            "audio": {
                "input": {"format": _format(self.input_format),
                          "turn_detection": None if detection is None else detection.model_dump(exclude={"early_start"})},
                "output": {"format": _format(self.output_format), "voice": self.call.voice.id if self.call.voice else None},
            },
        }


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise CallerError(f"`{field}` must be an object", code="invalid_event")
    return dict(value)


def _turn_detection(raw: dict | None, early_start: bool) -> TurnDetection | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type", "server_vad") != "server_vad":
        kind = raw.get("type") if isinstance(raw, dict) else raw
        raise CallerError(f"turn_detection {kind!r} is not supported: use server_vad or null", code="invalid_turn_detection")
    known = {k: v for k, v in raw.items() if k in TurnDetection.model_fields}
    return TurnDetection.model_validate({"early_start": early_start, **known})


def _format(line: LineFormat) -> dict:
    return {LineFormat.PCM16_24K: {"type": "audio/pcm", "rate": 24000}, LineFormat.PCMU: {"type": "audio/pcmu"},
            LineFormat.PCMA: {"type": "audio/pcma"}}[line]


def _base64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise CallerError(f"`{field}` must be a base64 string", code="invalid_event")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CallerError(f"`{field}` is not valid base64", code="invalid_base64") from None


def _error_event(code: str, message: str, event_id: str | None = None) -> dict:
    kind = "invalid_request_error" if code not in ("internal_error", "server_error") else "server_error"
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": None,
                                       "event_id": event_id}}


def _part_of(reply: Reply) -> dict:
    return {"response_id": reply.id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}


def _user_item(item_id: str, text: str | None, status: str) -> dict:
    content = [{"type": "input_text", "text": text}] if text else [{"type": "input_audio", "transcript": None}]
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status,
            "content": content}


def _assistant_item(reply: Reply, status: str) -> dict:
    return {"id": reply.item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_audio", "transcript": reply.transcript}]}


def _response(reply: Reply, status: str, output: list) -> dict:
    details = None
    if status in ("cancelled", "failed", "incomplete"):
        details = {"type": status, "reason": reply.reason}
        if status == "failed":
            details["error"] = {"type": "server_error", "code": reply.reason}
    return {"id": reply.id, "object": "realtime.response", "status": status, "status_details": details,
            "output": output, "output_modalities": ["audio"], "conversation_id": None}


def _reply_started(reply: Reply) -> list[dict]:
    part = {"response_id": reply.id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}
    item = _assistant_item(reply, "in_progress")
    return [
        {"type": "response.created", "response": _response(reply, "in_progress", [])},
        {"type": "response.output_item.added", "response_id": reply.id, "output_index": 0, "item": item},
        {"type": "conversation.item.added", "item": item},
        {"type": "response.content_part.added", **part, "part": {"type": "audio", "transcript": ""}},
    ]


def _reply_finished(reply: Reply) -> list[dict]:
    status = {"completed": "completed", "cancelled": "cancelled", "failed": "failed"}[reply.status]
    item_status = "completed" if status == "completed" else "incomplete"
    item = _assistant_item(reply, item_status)
    part = _part_of(reply)
    return [
        {"type": "response.output_audio.done", **part},
        {"type": "response.output_audio_transcript.done", **part, "transcript": reply.transcript},
        {"type": "response.content_part.done", **part, "part": {"type": "audio", "transcript": reply.transcript}},
        {"type": "response.output_item.done", "response_id": reply.id, "output_index": 0, "item": item},
        {"type": "conversation.item.done", "item": item},
        {"type": "response.done", "response": _response(reply, status, [item])},
    ]


async def _quietly(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
