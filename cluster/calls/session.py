"""`CallSession`: one live, full-duplex call, shared by every call protocol (OpenAI Realtime, telephony).

Plain Python, no Ray. It takes the caller's audio as it arrives (16 kHz float32), runs turn detection
(cluster.calls.vad), commits the caller's turn at the end of speech, starts the reply through the turn pipeline
(the same `TurnBackend.run_turn` the HTTP API uses), streams the reply out as `CallEvent`s and keeps each
reply's playback cursor: generated, sent and played ms.

- Barge-in: caller speech during a reply cancels it, which frees every slot down to the Reasoner's request.
- History: the session (Redis) commits only what the caller heard: the reply text keeps exactly the tokens
  whose frames were played (token k enters with frame 2k; `TextDelta.at_frame` says which frame exactly), in
  one atomic turn commit once the reply is over for the caller. A later, shorter report of what was played
  (`truncate`) revises it.
- Early start: optionally, the reply starts while the caller is still in the silence window; its events are
  held back until the window ends, and the reply is dropped without a trace if the caller resumes.
- Reply places: with admission control (`places`), a reply holds one of the cluster's reply places only while it
  is generated; when none frees up within the line's budget the reply fails in-band (`over_capacity`) and the
  caller's turn waits to be answered with the next one.
- A long call: each reply's prompt is planned by the backend's history policy (the session's truncation); what
  it drops leaves the session with the turn's commit, and the call says so (`ItemDeleted`), as it does for an
  item the client deletes (`delete_item`).

The protocol owns the transport: it reads `events()`, sends them, tells `audio_sent` what it sent and, where
the transport says what was played (telephony marks), reports it on the reply's cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from cluster.api.metrics import ApiMetrics
from cluster.calls.vad import SilenceStarted, SpeechResumed, SpeechStarted, SpeechStopped, TurnDetection, TurnDetector
from cluster.pipeline.history import TurnPlan, UserTurn
from cluster.pipeline.turn import AudioChunk, ReplyEvent, TextDelta, TurnBackend, TurnDone
from cluster.settings.calls import CallSettings
from cluster.settings.tenants import Kind
from cluster.state.history import Truncation
from cluster.state.store import Session, StateStore, Voice
from model.errors import CallerError, CapacityError, ChromaError, Conflict, InvalidInput, NotFound
from model.processing.audio import CODEC_RATE, REASONER_RATE
from model.processing.processor import ChromaProcessor

log = logging.getLogger(__name__)

FRAME_MS = 80  # one Mimi frame
MIN_COMMIT_MS = 100
PLAYBACK_STOP_WAIT_S = 1.0  # how long a barge-in waits for the protocol to stop the far end's playback


# ---- playback ---------------------------------------------------------------------------------------------
class PlaybackCursor:
    """Generated, sent and played ms of one reply. Without word from the far end (OpenAI Realtime over a
    WebSocket cannot hear the client's playback) it assumes real-time playback from the first audio sent;
    `report_played` replaces the estimate with what the far end said it played (a truncation, a mark)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.generated_ms = 0.0
        self.sent_ms = 0.0
        self.first_sent_at: float | None = None
        self.reported_ms: float | None = None
        self.underruns = 0
        self.stopped = asyncio.Event()  # set by the protocol once playback was stopped for a barge-in

    def sent(self, ms: float) -> None:
        now = self.clock()
        if self.first_sent_at is None:
            self.first_sent_at = now
        elif 1000 * (now - self.first_sent_at) > self.sent_ms + 20:  # the far end ran dry before this arrived
            self.underruns += 1
            self.first_sent_at = now - self.sent_ms / 1000  # playback resumes from here
        self.sent_ms += ms

    def report_played(self, ms: float) -> None:
        self.reported_ms = ms

    def played_ms(self) -> float:
        if self.reported_ms is not None:
            return self.reported_ms
        if self.first_sent_at is None:
            return 0.0
        return min(self.sent_ms, 1000 * (self.clock() - self.first_sent_at))

    async def wait_played(self, target_ms: float, stall_s: float = 5.0) -> None:
        """Until `target_ms` have played, or nothing more has played for `stall_s`."""
        last, stalled_since = -1.0, self.clock()
        while (played := self.played_ms()) < target_ms:
            if played > last:
                last, stalled_since = played, self.clock()
            elif self.clock() - stalled_since > stall_s:
                return
            await asyncio.sleep(min(0.25, max(0.01, (target_ms - played) / 1000)))


# ---- what a call emits ------------------------------------------------------------------------------------
@dataclass
class UserInput:
    """The caller's turn waiting for (or answered by) a reply."""

    item_id: str
    audio: np.ndarray | None = None  # 16 kHz float32
    text: str | None = None

    def extend(self, later: UserInput) -> None:
        """Two commits before a reply are one turn."""
        if later.audio is not None:
            self.audio = later.audio if self.audio is None else np.concatenate([self.audio, later.audio])
        if later.text:
            self.text = f"{self.text} {later.text}" if self.text else later.text

    def turn(self) -> UserTurn:
        return UserTurn.of(self.item_id, self.audio, self.text)


@dataclass
class Reply:
    """One assistant reply of a call."""

    id: str
    item_id: str
    user: UserInput
    cursor: PlaybackCursor
    committed_at: float | None  # the caller's turn was committed (voice-to-voice latency counts from here)
    vad_window_s: float  # how long the turn detector waited in silence before that
    task: asyncio.Task | None = None
    held: list | None = None  # events held back while the reply is speculative (early start)
    status: Literal["in_progress", "completed", "cancelled", "failed"] = "in_progress"
    reason: str | None = None  # why it was cancelled (turn_detected, client_cancelled, ...) or failed
    tokens: list[tuple[int, list[int]]] = field(default_factory=list)  # (frame it entered with, tokens)
    transcript: str = ""
    frames: int = 0  # generated
    plan: TurnPlan | None = None  # its prompt, as the history policy planned it
    committed_version: int | None = None  # the session version its turn was committed as
    committed_text: str | None = None
    settled: bool = False  # over for the caller: no more history changes but a truncation's
    barged_in: bool = False
    # A barge-in and the client's truncate can settle one reply at once: one commit, then revisions, in order.
    settling: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def audio_ms(self) -> int:
        return self.frames * FRAME_MS


class Place(Protocol):
    def started(self) -> None: ...

    async def release(self) -> None: ...


class ReplyPlaces(Protocol):
    """Admission control as a call sees it (`cluster.admission.control.Admission`)."""

    async def admit(self, tenant: str, kind: Kind) -> Place:
        """A reply place, waiting in line for one up to its budget (CapacityError past it)."""

    def note_failure(self, error: BaseException) -> None:
        """A reply failed with `error` (a replica that died takes its stage out of admission)."""


@dataclass
class CallEvent:
    pass


@dataclass
class SpeechStartedEvent(CallEvent):
    item_id: str
    audio_start_ms: int


@dataclass
class SpeechStoppedEvent(CallEvent):
    item_id: str
    audio_end_ms: int


@dataclass
class InputCommitted(CallEvent):
    item_id: str
    previous_item_id: str | None
    text: str | None  # a typed user message; None for caller audio


@dataclass
class InputCleared(CallEvent):
    pass


@dataclass
class ReplyStarted(CallEvent):
    reply: Reply


@dataclass
class ReplyAudio(CallEvent):
    reply: Reply
    audio: np.ndarray  # float32 at CODEC_RATE


@dataclass
class ReplyText(CallEvent):
    reply: Reply
    delta: str


@dataclass
class ReplyFinished(CallEvent):
    reply: Reply


@dataclass
class PlaybackStopped(CallEvent):
    """The caller barged in on a reply: what is still queued at the far end should be dropped (telephony
    `clear`); the reply's generation, if any, has already stopped."""

    reply: Reply


@dataclass
class ItemTruncated(CallEvent):
    item_id: str
    audio_end_ms: int


@dataclass
class ItemDeleted(CallEvent):
    """An item left the conversation: the client deleted it, or the session's truncation dropped it."""

    item_id: str


@dataclass
class CallError(CallEvent):
    """Something the client should know about; the call goes on."""

    code: str
    message: str
    event_id: str | None = None


class CallSession:
    """See the module docstring. Drive it from one event loop; read `events()` until it ends (closed)."""

    def __init__(
        self, tenant: str, state: StateStore, backend: TurnBackend, processor: ChromaProcessor,
        settings: CallSettings, metrics: ApiMetrics, cursor_factory: Callable[[], PlaybackCursor] = PlaybackCursor,
        places: ReplyPlaces | None = None,
    ):
        self.tenant, self.state, self.backend, self.processor = tenant, state, backend, processor
        self.settings, self.metrics, self.cursor_factory = settings, metrics, cursor_factory
        self.places = places  # None: replies take no reply place (nothing bounds them here)
        self.queue: asyncio.Queue[CallEvent | None] = asyncio.Queue()
        self.session: Session | None = None
        self.voice: Voice | None = None
        self.instructions = ""
        self.truncation: Truncation | None = None  # until set: the session's, or the server's default
        self.turn_detection: TurnDetection | None = TurnDetection(early_start=settings.early_start)
        self.detector: TurnDetector | None = None
        self.manual_buffer: list[np.ndarray] = []  # caller audio while turn detection is off
        self.speech_item_id: str | None = None
        self.committed_at: float | None = None
        self.vad_window_s = 0.0
        self.pending: UserInput | None = None  # committed, not yet answered
        self.last_item_id: str | None = None
        self.reply: Reply | None = None  # generating or playing, not yet settled
        self.speculative: Reply | None = None
        self._interrupting: asyncio.Task | None = None  # a barge-in still settling its reply
        self.replies: dict[str, Reply] = {}  # assistant item id -> reply, for truncation
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # ---- setup -------------------------------------------------------------------------------------------
    async def resume(self, session_id: str) -> None:
        """Go on with an existing session (its voice, instructions and history)."""
        self.session = await self.state.get_session(self.tenant, session_id)
        self.voice = await self.state.get_voice(self.tenant, self.session.voice_id)
        self.instructions, self.truncation = self.session.system_prompt, self.session.truncation

    async def configure(
        self, *, instructions: str | None = None, voice_id: str | None = None,
        turn_detection: TurnDetection | None | Literal["unchanged"] = "unchanged", truncation: Truncation | None = None,
    ) -> None:
        """session.update; an unknown voice raises NotFound and changes nothing. The call's Redis session exists
        from the moment it has a voice, and keeps the call's instructions, voice and truncation for a resumed call
        (`truncation` None: unchanged, or the server's default for a new session)."""
        voice = await self.state.get_voice(self.tenant, voice_id) if voice_id is not None else self.voice
        instructions = self.instructions if instructions is None else instructions
        truncation = self.truncation if truncation is None else truncation
        if voice is not None and self.session is None:
            self.session = await self.state.create_session(
                self.tenant, voice.id, instructions, truncation=truncation or self.backend.history.settings.truncation)
        elif self.session is not None and (voice.id, instructions, truncation) != (
                self.session.voice_id, self.session.system_prompt, self.session.truncation):
            self.session = await self.state.update_settings(self.tenant, self.session, system_prompt=instructions,
                                                            voice_id=voice.id, truncation=truncation)
        self.voice, self.instructions = voice, instructions
        self.truncation = truncation if self.session is None else self.session.truncation
        if turn_detection != "unchanged":
            self.turn_detection, self.detector, self.manual_buffer = turn_detection, None, []

    # ---- caller input ------------------------------------------------------------------------------------
    async def append_audio(self, audio: np.ndarray) -> None:
        """Caller audio, 16 kHz float32, as it arrives."""
        if self.turn_detection is None:
            self.manual_buffer.append(audio)
            if sum(a.size for a in self.manual_buffer) > self.settings.max_utterance_s * REASONER_RATE:
                self.manual_buffer = []
                self.emit(CallError("input_audio_buffer_too_long", "the input audio buffer passed "
                                    f"{self.settings.max_utterance_s:g} s without a commit and was cleared"))
            return
        if self.detector is None:
            self.detector = TurnDetector(self.turn_detection)
        for event in await asyncio.to_thread(self.detector.feed, audio):  # the VAD is model math
            await self._on_turn_event(event)

    async def _on_turn_event(self, event) -> None:
        detection = self.turn_detection
        if isinstance(event, SpeechStarted):
            self.speech_item_id = _item_id()
            self.emit(SpeechStartedEvent(self.speech_item_id, event.audio_start_ms))
            if self.reply is not None and not self.reply.barged_in and detection.interrupt_response:
                # Its own task: the protocol keeps reading (telephony marks say what was played until it stopped).
                self._interrupting = self._spawn(self._barge_in(self.reply))
        elif isinstance(event, SilenceStarted) and detection.early_start and detection.create_response:
            await self._start_speculative(event.audio)
        elif isinstance(event, SpeechResumed):
            await self._drop_speculative()
        elif isinstance(event, SpeechStopped):
            self.committed_at, self.vad_window_s = time.monotonic(), detection.silence_duration_ms / 1000
            self.emit(SpeechStoppedEvent(self.speech_item_id or _item_id(), event.audio_end_ms))
            if event.audio.size > self.settings.max_utterance_s * REASONER_RATE:
                await self._drop_speculative()
                self.emit(CallError("input_audio_buffer_too_long", "the caller's turn was longer than "
                                    f"{self.settings.max_utterance_s:g} s and was dropped"))
                return
            self._commit(UserInput(self.speech_item_id or _item_id(), audio=event.audio))
            if detection.create_response:
                await self._answer()

    def commit_input(self) -> None:
        """input_audio_buffer.commit."""
        if self.turn_detection is None:
            audio = np.concatenate(self.manual_buffer) if self.manual_buffer else np.zeros(0, np.float32)
            self.manual_buffer = []
        else:
            audio = self.detector.buffered_audio() if self.detector else np.zeros(0, np.float32)
        if audio.size < MIN_COMMIT_MS * REASONER_RATE // 1000:
            raise InvalidInput(f"the input audio buffer holds {1000 * audio.size // REASONER_RATE} ms; a commit needs "
                               f"at least {MIN_COMMIT_MS} ms", code="input_audio_buffer_commit_empty")
        if self.detector:
            self.detector.reset()
        self.committed_at, self.vad_window_s = time.monotonic(), 0.0
        self._commit(UserInput(self.speech_item_id or _item_id(), audio=audio))

    def clear_input(self) -> None:
        """input_audio_buffer.clear."""
        self.manual_buffer = []
        if self.detector:
            self.detector.reset()
        self.emit(InputCleared())

    def add_user_message(self, text: str | None, audio: np.ndarray | None) -> str:
        """conversation.item.create of a user message (typed text and/or 16 kHz audio)."""
        if not text and (audio is None or audio.size == 0):
            raise InvalidInput("a user message needs input_text or input_audio content")
        item_id = _item_id()
        self._commit(UserInput(item_id, audio=audio, text=text or None))
        return item_id

    def _commit(self, user: UserInput) -> None:
        self.emit(InputCommitted(user.item_id, self.last_item_id, user.text))
        self.last_item_id, self.speech_item_id = user.item_id, None
        if self.pending is None:
            self.pending = user
        else:
            self.pending.extend(user)

    # ---- replies -----------------------------------------------------------------------------------------
    async def create_response(self) -> None:
        """response.create."""
        if self.reply is not None and self.reply.status == "in_progress":
            raise InvalidInput("a response is already in progress; cancel it first",
                               code="conversation_already_has_active_response")
        if self.pending is None:
            raise InvalidInput("nothing to respond to: commit the caller's audio or add a user message first",
                               code="no_user_input")
        await self._answer()

    async def cancel_response(self, response_id: str | None = None) -> None:
        """response.cancel."""
        reply = self.reply
        if reply is None or reply.status != "in_progress" or (response_id and response_id != reply.id):
            raise InvalidInput("there is no active response to cancel", code="response_cancel_not_active")
        await self._stop(reply, "client_cancelled")

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """conversation.item.truncate: the caller heard `audio_end_ms` of the reply item."""
        reply = self.replies.get(item_id)
        if reply is None:
            raise InvalidInput(f"no assistant item {item_id!r} with audio in this call", code="item_not_found")
        if not 0 <= audio_end_ms <= reply.audio_ms:
            raise InvalidInput(f"audio_end_ms {audio_end_ms} is beyond the item's {reply.audio_ms} ms of audio",
                               code="invalid_audio_end_ms")
        reply.cursor.report_played(audio_end_ms)
        await self._stop(reply, "truncated")
        self.emit(ItemTruncated(item_id, audio_end_ms))

    async def delete_item(self, item_id: str) -> None:
        """conversation.item.delete: the item leaves the conversation the Reasoner reads."""
        if self.pending is not None and self.pending.item_id == item_id:
            self.pending = None  # committed, not answered yet: it never reaches the history
        elif self.reply is not None and item_id in (self.reply.item_id, self.reply.user.item_id):
            raise InvalidInput(f"item {item_id!r} belongs to the response in progress; cancel it first",
                               code="conversation_already_has_active_response")
        else:
            try:
                if self.session is None:
                    raise NotFound("item", item_id)
                self.session = await self.state.delete_item(self.tenant, self.session.id, item_id)
            except NotFound:
                raise InvalidInput(f"no item {item_id!r} in this conversation", code="item_not_found") from None
            self.replies.pop(item_id, None)
        self.emit(ItemDeleted(item_id))

    async def _answer(self) -> None:
        """Start the reply to the pending turn, or take over the one started in the silence window."""
        await self._finish_barge_in()  # the interrupted turn joins the history before the next one reads it
        if self.voice is None:
            self.emit(CallError("no_voice", "no voice: set session.audio.output.voice to a voice id from /v1/voices"))
            await self._drop_speculative()
            return
        user, self.pending = self.pending, None
        reply, self.speculative = self.speculative, None
        if reply is None:
            reply = self._launch(user, held=None)
        else:  # the same audio, now committed under its item id
            reply.user, reply.committed_at, reply.vad_window_s = user, self.committed_at, self.vad_window_s
        self.reply = reply
        self.replies[reply.item_id] = reply
        self.emit(ReplyStarted(reply))
        held, reply.held = reply.held or [], None
        for event in held:
            self.emit(event)
        if reply.task.done():  # it finished while held back
            self._finished(reply)

    def _launch(self, user: UserInput, held: list | None) -> Reply:
        reply = Reply(id=_response_id(), item_id=_item_id(), user=user, cursor=self.cursor_factory(),
                      committed_at=self.committed_at, vad_window_s=self.vad_window_s, held=held)
        reply.task = self._spawn(self._generate(reply))
        return reply

    async def _start_speculative(self, audio: np.ndarray) -> None:
        await self._drop_speculative()
        user = UserInput("speculative", audio=None, text=None)
        if self.pending is not None:  # earlier commits not yet answered are part of this turn
            user.extend(self.pending)
        user.extend(UserInput("", audio=audio))
        self.speculative = self._launch(user, held=[])

    async def _drop_speculative(self) -> None:
        reply, self.speculative = self.speculative, None
        if reply is not None:
            await _cancel(reply.task)

    async def _generate(self, reply: Reply) -> None:
        place = None
        try:
            if self.places is not None:
                place = await self.places.admit(self.tenant, "reply")
                place.started()
            session, voice = self.session, self.voice
            reply.plan = self.backend.history.plan(session, reply.user.turn())
            events = self.backend.run_turn(f"turn_{reply.id}", voice, session, reply.plan)
            async with contextlib.aclosing(events):
                async for event in events:
                    self._on_reply_event(reply, event)
            reply.status = "completed"
        except asyncio.CancelledError:
            if reply.status == "in_progress":
                reply.status = "cancelled"
            raise
        except Exception as error:
            reply.status = "failed"
            reply.reason = error.code if isinstance(error, ChromaError) else "internal_error"
            if isinstance(error, CallerError | CapacityError):  # context_full, no reply place: the call goes on
                self._out(reply, CallError(error.code, error.message))
            if not isinstance(error, ChromaError):
                log.exception("call reply %s failed", reply.id)
            if self.places is not None:
                self.places.note_failure(error)
        finally:
            if place is not None:  # generated (or stopped): the place is free for another reply
                await asyncio.shield(place.release())
            if reply.held is None and reply.status in ("completed", "failed"):
                self._finished(reply)

    def _finished(self, reply: Reply) -> None:
        """Generation ended on its own: say so, then settle once the caller has heard it (or give the turn back
        to be answered again, if it failed)."""
        self.emit(ReplyFinished(reply))
        if reply.status == "failed":
            if self.pending is not None:
                reply.user.extend(self.pending)
            self.pending = reply.user
            self.reply = None if self.reply is reply else self.reply
        else:
            self._spawn(self._settle_after_playback(reply))

    def _on_reply_event(self, reply: Reply, event: ReplyEvent) -> None:
        if isinstance(event, TextDelta):
            if event.tokens:
                reply.tokens.append((event.at_frame, event.tokens))
            if event.text:
                reply.transcript += event.text
                self._out(reply, ReplyText(reply, event.text))
        elif isinstance(event, AudioChunk):
            frames = round(event.audio.size * 1000 / CODEC_RATE / FRAME_MS)
            reply.frames += frames
            reply.cursor.generated_ms += frames * FRAME_MS
            self._out(reply, ReplyAudio(reply, event.audio))
        elif isinstance(event, TurnDone) and event.text.startswith(reply.transcript) and event.text != reply.transcript:
            self._out(reply, ReplyText(reply, event.text[len(reply.transcript):]))
            reply.transcript = event.text

    def _out(self, reply: Reply, event: CallEvent) -> None:
        if reply.held is not None:
            reply.held.append(event)
        else:
            self.emit(event)

    def audio_sent(self, reply: Reply, ms: float) -> None:
        """The protocol handed `ms` of the reply's audio to the transport."""
        first = reply.cursor.first_sent_at is None
        underruns = reply.cursor.underruns
        reply.cursor.sent(ms)
        if first and reply.committed_at is not None:
            latency = time.monotonic() - reply.committed_at
            self.metrics.voice_to_voice.labels("excluded").observe(latency)
            self.metrics.voice_to_voice.labels("included").observe(latency + reply.vad_window_s)
        if reply.cursor.underruns > underruns:
            self.metrics.call_underruns.inc()

    async def _barge_in(self, reply: Reply) -> None:
        """Stop the reply and its playback, then commit what was heard up to the moment playback stopped."""
        started, reply.barged_in = time.monotonic(), True
        await self._halt(reply, "turn_detected")
        self.emit(PlaybackStopped(reply))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reply.cursor.stopped.wait(), PLAYBACK_STOP_WAIT_S)
        self.metrics.barge_in.observe(time.monotonic() - started)
        await self._settle(reply)

    async def _finish_barge_in(self) -> None:
        task, self._interrupting = self._interrupting, None
        if task is not None:
            with contextlib.suppress(Exception):  # its own errors were reported as it ran
                await asyncio.wait_for(asyncio.shield(task), PLAYBACK_STOP_WAIT_S + 10)

    async def _stop(self, reply: Reply, reason: str) -> None:
        """Stop a reply now (client cancel, truncation, hang-up) and commit the turn with what the caller heard."""
        await self._halt(reply, reason)
        await self._settle(reply)

    async def _halt(self, reply: Reply, reason: str) -> None:
        """Generation stops, which frees every slot down to the Reasoner's request."""
        if reply.status == "in_progress":
            reply.status, reply.reason = "cancelled", reason
            await _cancel(reply.task)
            self.emit(ReplyFinished(reply))

    async def _settle_after_playback(self, reply: Reply) -> None:
        await reply.cursor.wait_played(reply.cursor.generated_ms)
        await self._settle(reply)

    async def _settle(self, reply: Reply) -> None:
        """Commit the reply's turn with the text the caller heard: once, then revise it if they heard less."""
        if self.reply is reply:
            self.reply = None
        async with reply.settling:
            if reply.status == "failed" or (reply.settled and reply.cursor.reported_ms is None):
                return
            reply.settled = True
            text = self._heard_text(reply)
            try:
                if reply.committed_version is None:
                    user, session, plan = reply.user.turn(), self.session, reply.plan
                    self.session = await self.state.append_turn(
                        self.tenant, session.id, user.audio, text, session.version, user_text=user.text,
                        ids=(user.id, reply.item_id), positions=self._positions(reply, user, text),
                        drop=None if plan is None else plan.drop,
                    )
                    reply.committed_version = self.session.version
                    for item_id in [] if plan is None else plan.drop.messages:
                        self.emit(ItemDeleted(item_id))
                elif text != reply.committed_text:
                    self.session = await self.state.revise_reply(self.tenant, self.session.id, reply.committed_version,
                                                                 text, self._positions(reply, None, text)[1])
                reply.committed_text = text
            except (Conflict, NotFound) as error:
                self.emit(CallError(error.code, f"the reply could not be saved to the session: {error.message}"))

    def _positions(self, reply: Reply, user: UserTurn | None, text: str) -> tuple[int | None, int | None]:
        """What the turn's messages take of the Reasoner's context (counted later where it was never planned)."""
        if reply.plan is None:
            return None, None
        history = self.backend.history
        return None if user is None else history.user_positions(user), history.text_positions("assistant", text)

    def _heard_text(self, reply: Reply) -> str:
        """The reply's text up to the last frame the caller heard (all of it once everything played)."""
        heard = reply.cursor.played_ms() // FRAME_MS
        everything = reply.status == "completed" and heard >= reply.frames
        tokens = [t for frame, chunk in reply.tokens if everything or frame < heard for t in chunk]
        return self.processor.decode_text(tokens)

    # ---- plumbing ----------------------------------------------------------------------------------------
    def emit(self, event: CallEvent) -> None:
        if not self._closed:
            self.queue.put_nowait(event)

    async def events(self) -> AsyncIterator[CallEvent]:
        while (event := await self.queue.get()) is not None:
            yield event

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """The call ended (hang-up, disconnect, a limit): stop everything, free every slot, and commit what the
        caller heard of the last reply."""
        await self._drop_speculative()
        await self._finish_barge_in()
        if self.reply is not None:
            await self._stop(self.reply, "call_ended")
        for task in list(self._tasks):
            await _cancel(task)
        self._closed = True
        self.queue.put_nowait(None)


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _item_id() -> str:
    return f"item_{uuid.uuid4().hex[:24]}"


def _response_id() -> str:
    return f"resp_{uuid.uuid4().hex[:24]}"
