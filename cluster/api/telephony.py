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
import logging
import uuid
from collections import deque
from dataclasses import dataclass

from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError

from cluster.admission.control import Ticket
from cluster.api.services import Services
from cluster.calls.audio import InboundAudio, LineFormat
from cluster.calls.cursor import MarkCursor
from cluster.calls.events import CallError, CallEvent, PlaybackStopped, ReplyAudio, ReplyFinished, ReplyStarted
from cluster.calls.session import CallSession
from cluster.calls.transport import BadMessage, CallTransport, ReplyEncoders
from cluster.calls.vad import TurnDetection
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


@dataclass
class _Sent:
    reply_id: str
    mark: str
    reply_ms: float  # of this reply, sent when the mark was
    total_ms: float  # of the whole call, sent when the mark was


class MediaStreamCall:
    def __init__(self, websocket: WebSocket, services: Services, dialect: Dialect):
        self.services, self.dialect = services, dialect
        self.transport = CallTransport(websocket, services.call_settings.max_message_bytes)
        self.settings: TelephonySettings = services.telephony_settings
        self.id = f"call_{uuid.uuid4().hex[:16]}"
        self.stream_id: str | None = None
        self.call: CallSession | None = None
        self.ticket: Ticket | None = None
        self.inbound: InboundAudio | None = None
        self.line = LineFormat.PCMU
        self.outbox: deque[tuple[str, bytes]] = deque()  # (reply id, encoded audio) not yet sent
        self.pending_bytes: dict[str, bytes] = {}  # per reply: less than a 20 ms frame, held for the next chunk
        self.encoders = ReplyEncoders()
        self.unacked: deque[_Sent] = deque()
        self.sent_ms = 0.0  # the whole call's
        self.acked_ms = 0.0
        self.marks_arrived = asyncio.Event()
        self.outbox_filled = asyncio.Event()

    # ---- the call ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while (message := await self._receive()) is not None:
                kind = message.get("event")
                if kind == "start" and self.call is None:
                    if not await self._start(message):
                        return
                    self.transport.tasks.spawn(self._write())
                    self.transport.tasks.spawn(self._pace())
                elif kind == "stop":
                    return
                elif self.call is None and kind != "connected":
                    self._bad(f"{kind!r} before start")
                else:
                    await self._handle(kind, message)
        finally:
            await self.transport.teardown(self.call)
            if self.ticket is not None:
                await self.services.release_call(self.ticket, self.dialect.name)

    async def _receive(self) -> dict | None:
        """The next JSON message (bad ones are logged and skipped); None once the carrier hung up."""
        while isinstance(message := await self.transport.receive(), BadMessage):
            self._bad(message.message)
        return message

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
        await self.transport.close(code=1013 if retry_later else 1008, reason=code)
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
            self.encoders.start(event.reply_id, self.line)
        elif isinstance(event, ReplyAudio):
            self._queue(event.reply_id, self.encoders.encode(event.reply_id, event.audio))
        elif isinstance(event, ReplyFinished):
            tail = self.encoders.finish(event)
            if event.outcome == "completed":
                self._queue(event.reply_id, tail, last=True)
            else:  # an unfinished reply's last part frame is not worth a padded one
                self.pending_bytes.pop(event.reply_id, None)
        elif isinstance(event, PlaybackStopped):
            await self._clear(event.reply_id)
        elif isinstance(event, CallError):
            log.warning("%s call %s: %s (%s)", self.dialect.name, self.id, event.message, event.code)

    def _queue(self, reply_id: str, data: bytes, last: bool = False) -> None:
        """Whole 20 ms frames only: what is left over waits for the next chunk (or is padded, at the end)."""
        frame = 20 * self.bytes_per_ms
        data = self.pending_bytes.pop(reply_id, b"") + data
        if last and len(data) % frame:
            data += SILENCE[self.line] * (frame - len(data) % frame)
        whole = len(data) - len(data) % frame
        if len(data) > whole:
            self.pending_bytes[reply_id] = data[whole:]
        if whole:
            self.outbox.append((reply_id, data[:whole]))
            self.outbox_filled.set()

    async def _pace(self) -> None:
        """Send queued audio as fast as the carrier plays it, never more than `max_lead_ms` ahead of its marks."""
        chunk = self.settings.chunk_ms * self.bytes_per_ms
        while True:
            while not self.outbox:
                self.outbox_filled.clear()
                await self.outbox_filled.wait()
            reply_id, data = self.outbox[0]
            if not self.call.may_play(reply_id):  # interrupted: its `clear` is on the way, and nothing more goes out
                self.outbox.popleft()
                continue
            room_ms = self.settings.max_lead_ms - (self.sent_ms - self.acked_ms)
            size = min(len(data), chunk, int(room_ms // 20) * 20 * self.bytes_per_ms)
            if size <= 0:
                self.marks_arrived.clear()
                await self.marks_arrived.wait()
                continue
            piece, rest = data[:size], data[size:]
            if rest:
                self.outbox[0] = (reply_id, rest)
            else:
                self.outbox.popleft()
            await self._send_media(reply_id, piece)

    async def _send_media(self, reply_id: str, piece: bytes) -> None:
        ms = len(piece) / self.bytes_per_ms
        reply_ms = self.call.audio_sent(reply_id, ms)
        self.sent_ms += ms
        mark = f"{reply_id}:{int(reply_ms)}"
        self.unacked.append(_Sent(reply_id, mark, reply_ms, self.sent_ms))
        await self.transport.send({"event": "media", self.dialect.stream_key: self.stream_id,
                                   "media": {"payload": base64.b64encode(piece).decode()}})
        await self.transport.send({"event": "mark", self.dialect.stream_key: self.stream_id, "mark": {"name": mark}})

    def _acknowledge(self, name: str | None) -> None:
        """A mark came back: everything sent before it has played."""
        if not any(sent.mark == name for sent in self.unacked):
            return  # unknown, or one a `clear` already dropped
        while self.unacked:
            sent = self.unacked.popleft()
            self.acked_ms = sent.total_ms
            if sent.mark == name:
                break
        self.call.mark_acked(sent.reply_id, sent.reply_ms, drained=not self.unacked and not self.outbox)
        self.marks_arrived.set()

    async def _clear(self, reply_id: str) -> None:
        """Barge-in: drop what the carrier has queued, and what we had not sent yet."""
        self.outbox = deque((r, d) for r, d in self.outbox if r != reply_id)
        self.pending_bytes.pop(reply_id, None)
        self.unacked.clear()  # the carrier echoes their marks after a clear: they say nothing was played
        self.acked_ms = self.sent_ms  # its queue is empty now
        self.marks_arrived.set()
        await self.transport.send({"event": "clear", self.dialect.stream_key: self.stream_id})
        self.call.playback_stopped(reply_id)
