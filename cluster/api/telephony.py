"""Telephony media streams on `CallSession`: Twilio Media Streams at `/v1/telephony/twilio`, Telnyx at
`/v1/telephony/telnyx` (the same event shapes; its `start.media_format.encoding` picks PCMU or PCMA).

The carrier opens the WebSocket (`<Connect><Stream url="wss://...">` in TwiML) and cannot send HTTP headers, so the
call names its tenant and voice in the stream's custom parameters: `api_key`, `voice_id`, and optionally
`session_id` (resume a session), `system_prompt` and `early_start` ("true": start replies inside the silence
window). A call without a valid key or voice is refused: the reason is
logged and the socket closed, with no audio sent.

The carrier plays whatever it is sent, in order, and says what was played only through the marks it echoes. So:
- Reply audio goes out as `media` in multiples of 20 ms, each chunk followed by a `mark` naming the reply and the
  ms sent so far; at most `max_lead_ms` of unplayed audio is ever queued at the carrier (pacing by the echoed
  marks), which is also all a barge-in has to throw away.
- On barge-in the reply is cancelled, `clear` is sent, pending marks are dropped, and the session's history keeps
  the reply up to the last acknowledged mark (CallSession commits what the cursor says was played).
- DTMF digits are recorded on the session (`key_presses`), for a backend's menus.
Malformed messages are logged and counted; the call goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import uuid
from collections import deque
from dataclasses import dataclass

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from redis.exceptions import RedisError

from cluster.admission.control import Ticket
from cluster.api.services import Services
from cluster.calls.audio import InboundAudio, LineFormat, OutboundAudio
from cluster.calls.vad import TurnDetection
from cluster.calls.session import (
    CallError,
    CallEvent,
    CallSession,
    PlaybackCursor,
    PlaybackStopped,
    Reply,
    ReplyAudio,
    ReplyFinished,
    ReplyStarted,
)
from cluster.settings.calls import TelephonySettings
from model.errors import ChromaError

log = logging.getLogger(__name__)

router = APIRouter()

SILENCE = {LineFormat.PCMU: b"\xff", LineFormat.PCMA: b"\xd5"}


@dataclass(frozen=True)
class Dialect:
    """Where the two carriers' otherwise identical messages differ."""

    name: str
    stream_key: str  # the stream id's field
    parameters_key: str  # the custom parameters' field inside `start`
    format_key: str  # the media format's field inside `start`
    encodings: dict[str, LineFormat]  # the encodings it names, the default first

    def line(self, start: dict) -> LineFormat:
        media_format = start.get(self.format_key)
        encoding = (media_format if isinstance(media_format, dict) else {}).get("encoding", next(iter(self.encodings)))
        if not isinstance(encoding, str) or encoding not in self.encodings:
            raise ValueError(f"unsupported media format {encoding!r}: use {' or '.join(self.encodings)}")
        return self.encodings[encoding]

    def stream_id(self, message: dict) -> str | None:
        return message.get(self.stream_key) or (message.get("start") or {}).get(self.stream_key)


TWILIO = Dialect("twilio", "streamSid", "customParameters", "mediaFormat", {"audio/x-mulaw": LineFormat.PCMU})
TELNYX = Dialect("telnyx", "stream_id", "custom_parameters", "media_format",
                 {"PCMU": LineFormat.PCMU, "PCMA": LineFormat.PCMA})


@router.websocket("/v1/telephony/twilio")
async def twilio(websocket: WebSocket) -> None:
    await _serve(websocket, TWILIO)


@router.websocket("/v1/telephony/telnyx")
async def telnyx(websocket: WebSocket) -> None:
    await _serve(websocket, TELNYX)


async def _serve(websocket: WebSocket, dialect: Dialect) -> None:
    await websocket.accept()
    await MediaStreamCall(websocket, websocket.app.state.services, dialect).run()


class MarkCursor(PlaybackCursor):
    """Played ms come from the carrier's echoed marks alone (and so do underruns: see `_acknowledge`)."""

    def sent(self, ms: float) -> None:
        self.first_sent_at = self.first_sent_at or self.clock()
        self.sent_ms += ms

    def played_ms(self) -> float:
        return self.reported_ms or 0.0


@dataclass
class _Sent:
    reply: Reply
    mark: str
    reply_ms: float  # of this reply, sent when the mark was
    total_ms: float  # of the whole call, sent when the mark was


class MediaStreamCall:
    def __init__(self, websocket: WebSocket, services: Services, dialect: Dialect):
        self.websocket, self.services, self.dialect = websocket, services, dialect
        self.settings: TelephonySettings = services.telephony_settings
        self.id = f"call_{uuid.uuid4().hex[:16]}"
        self.stream_id: str | None = None
        self.call: CallSession | None = None
        self.ticket: Ticket | None = None
        self.inbound: InboundAudio | None = None
        self.line = LineFormat.PCMU
        self.outbox: deque[tuple[Reply, bytes]] = deque()  # encoded, not yet sent
        self.pending_bytes: dict[str, bytes] = {}  # per reply: less than a 20 ms frame, held for the next chunk
        self.encoders: dict[str, OutboundAudio] = {}
        self.unacked: deque[_Sent] = deque()
        self.sent_ms = 0.0  # the whole call's
        self.acked_ms = 0.0
        self.marks_arrived = asyncio.Event()
        self.outbox_filled = asyncio.Event()
        self.cleared: set[str] = set()  # replies whose queued audio a `clear` dropped: their marks mean nothing

    # ---- the call ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        tasks: list[asyncio.Task] = []
        try:
            while True:
                message = await self._receive()
                if message is None:
                    return
                kind = message.get("event")
                if kind == "start" and self.call is None:
                    if not await self._start(message):
                        return
                    tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._pace())]
                elif kind == "stop":
                    return
                elif self.call is None and kind != "connected":
                    self._bad(f"{kind!r} before start")
                else:
                    await self._handle(kind, message)
        finally:
            if self.call is not None:
                await self.call.close()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.ticket is not None:
                await self.services.release_call(self.ticket, self.dialect.name)
            with contextlib.suppress(Exception):
                await self.websocket.close()

    async def _receive(self) -> dict | None:
        """The next JSON message (malformed ones are logged and skipped); None once the carrier hung up."""
        while True:
            try:
                received = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if received["type"] == "websocket.disconnect":
                return None
            text = received.get("text")
            if text is None:
                self._bad("a binary frame")
                continue
            if len(text) > self.services.call_settings.max_message_bytes:
                self._bad("message too large")
                continue
            try:
                message = json.loads(text)
            except json.JSONDecodeError:
                self._bad("malformed JSON")
                continue
            if isinstance(message, dict):
                return message
            self._bad("a message that is not an object")

    async def _start(self, message: dict) -> bool:
        """Authenticate and admit the call from its custom parameters; False (the socket closed) if refused."""
        start = message.get("start") if isinstance(message.get("start"), dict) else {}
        parameters = start.get(self.dialect.parameters_key) or {}
        services = self.services
        tenant = services.tenants.tenant_for(parameters.get("api_key"))
        if tenant is None:
            return await self._refuse("unauthorized", "missing or unknown api_key parameter")
        try:
            self.line = self.dialect.line(start)
            self.ticket = await services.admit_call(tenant, self.dialect.name)
            call = CallSession(tenant, services.state, services.backend, services.backend.processor,
                               services.call_settings, services.metrics, MarkCursor, places=services.admission)
            if session_id := parameters.get("session_id"):
                await call.resume(session_id)
            early_start = str(parameters.get("early_start", services.call_settings.early_start)).lower() in ("true", "1")
            await call.configure(voice_id=parameters.get("voice_id") or (call.voice.id if call.voice else None),
                                 instructions=parameters.get("system_prompt"),
                                 turn_detection=TurnDetection(early_start=early_start))
            if call.voice is None:
                return await self._refuse("no_voice", "missing voice_id parameter")
        except ChromaError as error:
            return await self._refuse(error.code, str(error), retry_later=error.retryable)
        except ValueError as error:
            return await self._refuse("invalid_start", str(error))
        self.call, self.stream_id = call, self.dialect.stream_id(message)
        self.inbound = InboundAudio(self.line)
        self.ticket.started()
        log.info("%s call %s started: tenant %s, stream %s, session %s", self.dialect.name, self.id, tenant,
                 self.stream_id, call.session.id)
        return True

    async def _refuse(self, code: str, reason: str, retry_later: bool = False) -> bool:
        """Close with 1013 (try again later) where the same call may be taken later, else 1008 (policy violation)."""
        self.services.metrics.calls_refused.labels(code).inc()
        log.warning("%s call %s refused: %s (%s)", self.dialect.name, self.id, reason, code)
        await self.websocket.close(code=1013 if retry_later else 1008, reason=code)
        return False

    async def _handle(self, kind: str | None, message: dict) -> None:
        if kind == "media":
            media = message.get("media") if isinstance(message.get("media"), dict) else {}
            if media.get("track", "inbound") not in ("inbound", "inbound_track"):
                return
            try:
                payload = base64.b64decode(media.get("payload", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                return self._bad("media payload is not valid base64")
            if not payload or len(payload) > self.settings.max_payload_ms * self.bytes_per_ms:
                return self._bad(f"media payload of {len(payload)} bytes")
            with contextlib.suppress(ChromaError):
                await self.call.append_audio(self.inbound.decode(payload))
        elif kind == "mark":
            self._acknowledge(((message.get("mark") or {}).get("name")))
        elif kind == "dtmf":
            digit = (message.get("dtmf") or {}).get("digit")
            if isinstance(digit, str) and len(digit) == 1 and digit in "0123456789*#ABCD":
                try:
                    await self.services.state.record_key_press(self.call.tenant, self.call.session.id, digit)
                except (ChromaError, RedisError) as error:
                    log.warning("%s call %s: key press %s not recorded: %r", self.dialect.name, self.id, digit, error)
            else:
                self._bad("a dtmf event without a digit")
        elif kind != "connected":
            self._bad(f"unknown event {kind!r}")

    def _bad(self, what: str) -> None:
        self.services.metrics.errors.labels("telephony_bad_message").inc()
        log.warning("%s call %s: ignored %s", self.dialect.name, self.id, what)

    @property
    def bytes_per_ms(self) -> int:
        """Of the call's line format: 8 for G.711 at 8 kHz."""
        return int(self.line.bytes_per_ms)

    # ---- reply audio out -----------------------------------------------------------------------------------
    async def _write(self) -> None:
        """CallEvents -> encoded 20 ms frames in the outbox (the pacer sends them); barge-in -> `clear`."""
        async for event in self.call.events():
            await self._on_event(event)

    async def _on_event(self, event: CallEvent) -> None:
        if isinstance(event, ReplyStarted):
            self.encoders[event.reply.id] = OutboundAudio(self.line)
        elif isinstance(event, ReplyAudio):
            self._queue(event.reply, self.encoders[event.reply.id].encode(event.audio))
        elif isinstance(event, ReplyFinished):
            encoder = self.encoders.pop(event.reply.id, None)
            if encoder is not None and event.reply.id not in self.cleared:
                self._queue(event.reply, encoder.flush(), last=True)
        elif isinstance(event, PlaybackStopped):
            await self._clear(event.reply)
        elif isinstance(event, CallError):
            log.warning("%s call %s: %s (%s)", self.dialect.name, self.id, event.message, event.code)

    def _queue(self, reply: Reply, data: bytes, last: bool = False) -> None:
        """Whole 20 ms frames only: what is left over waits for the next chunk (or is padded, at the end)."""
        frame = 20 * self.bytes_per_ms
        data = self.pending_bytes.pop(reply.id, b"") + data
        if last and len(data) % frame:
            data += SILENCE[self.line] * (frame - len(data) % frame)
        whole = len(data) - len(data) % frame
        if len(data) > whole:
            self.pending_bytes[reply.id] = data[whole:]
        if whole:
            self.outbox.append((reply, data[:whole]))
            self.outbox_filled.set()

    async def _pace(self) -> None:
        """Send queued audio as fast as the carrier plays it, never more than `max_lead_ms` ahead of its marks."""
        chunk = self.settings.chunk_ms * self.bytes_per_ms
        while True:
            while not self.outbox:
                self.outbox_filled.clear()
                await self.outbox_filled.wait()
            reply, data = self.outbox[0]
            room_ms = self.settings.max_lead_ms - (self.sent_ms - self.acked_ms)
            size = min(len(data), chunk, int(room_ms // 20) * 20 * self.bytes_per_ms)
            if size <= 0:
                self.marks_arrived.clear()
                await self.marks_arrived.wait()
                continue
            piece, rest = data[:size], data[size:]
            if rest:
                self.outbox[0] = (reply, rest)
            else:
                self.outbox.popleft()
            await self._send_media(reply, piece)

    async def _send_media(self, reply: Reply, piece: bytes) -> None:
        ms = len(piece) / self.bytes_per_ms
        self.call.audio_sent(reply, ms)
        self.sent_ms += ms
        mark = f"{reply.id}:{int(reply.cursor.sent_ms)}"
        self.unacked.append(_Sent(reply, mark, reply.cursor.sent_ms, self.sent_ms))
        await self._send({"event": "media", self.dialect.stream_key: self.stream_id,
                          "media": {"payload": base64.b64encode(piece).decode()}})
        await self._send({"event": "mark", self.dialect.stream_key: self.stream_id, "mark": {"name": mark}})

    def _acknowledge(self, name: str | None) -> None:
        """A mark came back: everything sent before it has played."""
        if not any(sent.mark == name for sent in self.unacked):
            return  # unknown, or one a `clear` already dropped
        while self.unacked:
            sent = self.unacked.popleft()
            self.acked_ms = sent.total_ms
            sent.reply.cursor.report_played(sent.reply_ms)
            if sent.mark == name:
                break
        if not self.unacked and sent.reply.status == "in_progress" and not self.outbox:
            self.services.metrics.call_underruns.inc()  # the carrier played everything; the reply was not done
        self.marks_arrived.set()

    async def _clear(self, reply: Reply) -> None:
        """Barge-in: drop what the carrier has queued, and what we had not sent yet."""
        self.cleared.add(reply.id)
        self.outbox = deque((r, d) for r, d in self.outbox if r is not reply)
        self.pending_bytes.pop(reply.id, None)
        self.unacked.clear()  # the carrier echoes their marks after a clear: they say nothing was played
        self.acked_ms = self.sent_ms  # its queue is empty now
        self.marks_arrived.set()
        await self._send({"event": "clear", self.dialect.stream_key: self.stream_id})
        reply.cursor.stopped.set()

    async def _send(self, message: dict) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await self.websocket.send_text(json.dumps(message, separators=(",", ":")))
