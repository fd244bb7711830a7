"""`CallSession`: one live, full-duplex call, shared by every call protocol (OpenAI Realtime, telephony).

Plain Python, no Ray. It takes the caller's audio as it arrives (16 kHz float32), runs turn detection
(cluster.calls.vad), commits the caller's turn at the end of speech, starts the reply through the turn pipeline
(the same `TurnBackend.run_turn` the HTTP API uses) and streams it out as `CallEvent`s (cluster.calls.events).
Each reply's life is one `ReplyState` (cluster.calls.reply), moved here and nowhere else.

- Barge-in: caller speech during a reply interrupts it in the same step that says the caller spoke, so not one
  more event of that reply follows; its generation is then cancelled, which frees every slot down to the
  Reasoner's request.
- History: the session (Redis) commits only what the caller heard: the reply text keeps exactly the tokens
  whose frames were played (token k enters with frame 2k; `TextDelta.at_frame` says which frame exactly), in
  one atomic turn commit once the reply is over for the caller. A truncate revises it, never below what an
  earlier truncate of the same item kept.
- Early start: optionally, the reply starts while the caller is still in the silence window (SPECULATIVE); what
  it says is held back until the window ends, and it is dropped without a trace if the caller resumes.
- Reply places: with admission control (`places`), a reply holds one of the cluster's reply places only while it
  is generated; when none frees up within the line's budget the reply fails in-band (`over_capacity`) and the
  caller's turn waits to be answered with the next one.
- A long call: each reply's prompt is planned by the backend's history policy (the session's truncation); what
  it drops leaves the session with the turn's commit, and the call says so (`ItemDeleted`), as it does for an
  item the client deletes (`delete_item`).

- Messages the client adds: a system or assistant text message joins the session's history at once, ahead of a
  turn still in progress (`add_text_message`); every reply planned from then on reads it.
- Input transcription: where the session asks for it, each committed caller utterance is also transcribed by the
  Reasoner, in a request of its own that starts once the reply has its first audio (`TranscriptionDelta`, then
  `TranscriptionCompleted` or `TranscriptionFailed`); the transcript joins the item's history entry.

The protocol owns the transport: it reads `events()`, sends them, and reports what happened by id: `audio_sent`,
`playback_stopped` and, where the far end acknowledges playback (telephony marks), `mark_acked`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from cluster.calls.cursor import PlaybackCursor
from cluster.calls.events import (
    CallError,
    CallEvent,
    InputCleared,
    InputCommitted,
    ItemDeleted,
    ItemInfo,
    ItemTruncated,
    Outcome,
    PlaybackStopped,
    ReplyAudio,
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
from cluster.calls.metrics import CallMetrics
from cluster.calls.reply import FRAME_MS, Reply, ReplyState, UserInput
from cluster.calls.transport import CallTasks, cancel_quietly
from cluster.calls.vad import SilenceStarted, SpeechResumed, SpeechStarted, SpeechStopped, TurnDetection, TurnDetector
from cluster.pipeline.history import UserTurn
from cluster.pipeline.turn import AudioChunk, ReplyEvent, TextDelta, TurnBackend, TurnDone
from cluster.settings.calls import CallSettings
from cluster.settings.tenants import Kind
from cluster.state.history import Truncation
from cluster.state.store import HistoryMessage, Session, StateStore, Voice
from model.errors import CallerError, CapacityError, ChromaError, Conflict, InvalidInput, NotFound
from model.processing.audio import CODEC_RATE, REASONER_RATE, pcm16_bytes
from model.processing.processor import ChromaProcessor
from model.reasoner.base import PromptStats

log = logging.getLogger(__name__)

MIN_COMMIT_MS = 100
PLAYBACK_STOP_WAIT_S = 1.0  # how long a barge-in waits for the protocol to stop the far end's playback


class Place(Protocol):
    def started(self) -> None: ...

    async def release(self) -> None: ...


class ReplyPlaces(Protocol):
    """Admission control as a call sees it (`cluster.admission.control.Admission`)."""

    async def admit(self, tenant: str, kind: Kind) -> Place:
        """A reply place, waiting in line for one up to its budget (CapacityError past it)."""

    def note_failure(self, error: BaseException) -> None:
        """A reply failed with `error` (a replica that died takes its stage out of admission)."""


@dataclass(frozen=True)
class _Ended:
    """Held by a SPECULATIVE reply whose generation ended: replayed, in order, when the reply is taken over."""

    outcome: Outcome
    reason: str | None


class CallSession:
    """See the module docstring. Drive it from one event loop; read `events()` until it ends (closed)."""

    def __init__(
        self, tenant: str, state: StateStore, backend: TurnBackend, processor: ChromaProcessor,
        settings: CallSettings, metrics: CallMetrics, cursor_factory: Callable[[], PlaybackCursor] = PlaybackCursor,
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
        self.transcribing = False  # the session asked for input transcription
        self.transcripts: dict[str, str] = {}  # finished, for user items not yet in the session's history
        self.detector: TurnDetector | None = None
        self.manual_buffer: list[np.ndarray] = []  # caller audio while turn detection is off
        self.speech_item_id: str | None = None
        self.committed_at: float | None = None
        self.vad_window_s = 0.0
        self.pending: UserInput | None = None  # committed, not yet answered
        self.last_item_id: str | None = None
        self.reply: Reply | None = None  # generating or playing, not yet committed
        self.speculative: Reply | None = None
        self._interrupting: asyncio.Task | None = None  # a barge-in still settling its reply
        self.replies: dict[str, Reply] = {}  # by id: every reply the caller heard of, for what the protocol reports
        self.text_items: set[str] = set()  # the system and assistant messages the client created (no audio)
        self._tasks = CallTasks()
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
        transcription: bool | None = None,
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
        if transcription is not None:
            self.transcribing = transcription

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
            reply = self.reply
            if reply is not None and reply.audible and detection.interrupt_response:
                started = time.monotonic()
                self._interrupt(reply, "turn_detected")
                self.emit(PlaybackStopped(reply.id, reply.item_id))
                # Its own task: the protocol keeps reading (telephony marks say what was played until it stopped).
                self._interrupting = self._tasks.spawn(self._barge_in(reply, started))
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

    def add_user_message(self, text: str | None, audio: np.ndarray | None, item_id: str | None = None) -> str:
        """conversation.item.create of a user message (typed text and/or 16 kHz audio), under the client's own item
        id if it gave one."""
        if not text and (audio is None or audio.size == 0):
            raise InvalidInput("a user message needs input_text or input_audio content")
        item_id = self._new_item_id(item_id)
        self._commit(UserInput(item_id, audio=audio, text=text or None), from_buffer=False)
        return item_id

    async def add_text_message(self, role: Literal["system", "assistant"], text: str, item_id: str | None = None) -> str:
        """conversation.item.create of a system or assistant message (a client's note for the replies to come, or a
        line it has the assistant say): it joins the session's history at once, so every reply planned from now on
        reads it. A turn still in progress commits after it: the reply being generated did not read it, and the
        item's previous_item_id tells the client where it went."""
        if not text.strip():
            raise InvalidInput(f"a {role} message needs input_text content")
        if self.session is None:
            raise InvalidInput(f"a {role} message joins the session's history, and there is none before a voice is "
                               "set: set session.audio.output.voice first", code="no_voice")
        item_id = self._new_item_id(item_id)
        message = HistoryMessage(id=item_id, role=role, text=text,
                                 positions=self.backend.history.text_positions(role, text))
        self.session = await self.state.append_message(self.tenant, self.session.id, message)
        index = next(n for n, m in enumerate(self.session.history) if m.id == item_id)
        previous = self.session.history[index - 1].id if index else None
        if previous == self.last_item_id:  # no turn in progress: the next item follows this one
            self.last_item_id = item_id
        self.text_items.add(item_id)
        self.emit(TextItemAdded(item_id, previous, role, text))
        return item_id

    def _new_item_id(self, item_id: str | None) -> str:
        """The client's id for an item it creates (refused if the conversation holds it already), or a new one."""
        if item_id is not None and self.find_item(item_id) is not None:
            raise InvalidInput(f"item {item_id!r} is already in this conversation", code="invalid_item_id")
        return item_id or _item_id()

    def _commit(self, user: UserInput, from_buffer: bool = True) -> None:
        self.emit(InputCommitted(user.item_id, self.last_item_id, user.text, from_buffer))
        if from_buffer and self.transcribing and user.audio is not None:
            self._tasks.spawn(self._transcribe(user.item_id, user.audio))
        self.last_item_id, self.speech_item_id = user.item_id, None
        if self.pending is None:
            self.pending = user
        else:
            self.pending.extend(user)

    # ---- replies -----------------------------------------------------------------------------------------
    async def create_response(self, metadata: dict[str, str] | None = None) -> None:
        """response.create; `metadata` comes back on the reply's events. With nothing pending the reply answers the
        conversation as it stands (a greeting, as OpenAI's does)."""
        if self.reply is not None and self.reply.generating:
            raise InvalidInput("a response is already in progress; cancel it first",
                               code="conversation_already_has_active_response")
        await self._answer(metadata)

    async def cancel_response(self, response_id: str | None = None) -> None:
        """response.cancel."""
        reply = self.reply
        if reply is None or not reply.generating or (response_id and response_id != reply.id):
            # OpenAI's wording: clients match on it, and take a barge-in's stray cancel for no error.
            raise InvalidInput("Cancellation failed: no active response found", code="response_cancel_not_active")
        await self._stop(reply, "client_cancelled")

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """conversation.item.truncate: the caller heard `audio_end_ms` of the reply item. A second truncate of the
        item keeps at least what the first kept: played audio cannot be unplayed, so a shorter one is a client
        that lost track (pipecat took a stray delta for a new reply once), not news."""
        reply = next((r for r in self.replies.values() if r.item_id == item_id), None)
        if reply is None:
            raise InvalidInput(f"no assistant item {item_id!r} with audio in this call", code="item_not_found")
        if audio_end_ms < 0:
            raise InvalidInput(f"audio_end_ms {audio_end_ms} is negative", code="invalid_audio_end_ms")
        # Past the item's audio means all of it: clients estimate, and a pipecat issue shows one failing fatally here.
        audio_end_ms = max(min(audio_end_ms, reply.audio_ms), reply.truncated_ms or 0)
        reply.truncated_ms = audio_end_ms
        reply.cursor.report_played(audio_end_ms)
        await self._stop(reply, "truncated")
        self.emit(ItemTruncated(item_id, audio_end_ms))

    async def delete_item(self, item_id: str) -> None:
        """conversation.item.delete: the item leaves the conversation the Reasoner reads."""
        if self.pending is not None and self.pending.item_id == item_id:
            self.pending = None  # committed, not answered yet: it never reaches the history
        elif self.reply is not None and item_id in (self.reply.item_id, _user_item_id(self.reply)):
            raise InvalidInput(f"item {item_id!r} belongs to the response in progress; cancel it first",
                               code="conversation_already_has_active_response")
        else:
            try:
                if self.session is None:
                    raise NotFound("item", item_id)
                self.session = await self.state.delete_item(self.tenant, self.session.id, item_id)
            except NotFound:
                raise InvalidInput(f"no item {item_id!r} in this conversation", code="item_not_found") from None
            self.replies = {id: r for id, r in self.replies.items() if r.item_id != item_id}
        self.emit(ItemDeleted(item_id))

    def find_item(self, item_id: str) -> ItemInfo | None:
        """An item of the conversation: in the session's history, waiting for its reply, or in a reply not committed
        yet. None for one never there, deleted, or dropped by truncation."""
        message = next((m for m in self.session.history if m.id == item_id), None) if self.session else None
        reply = next((r for r in reversed(self.replies.values()) if item_id in (r.item_id, _user_item_id(r))), None)
        if message is not None:
            cut = reply is not None and reply.item_id == item_id and reply.outcome != "completed"
            has_audio = message.audio_bytes > 0 or (message.role == "assistant" and item_id not in self.text_items)
            return ItemInfo(item_id, message.role, message.text, has_audio, complete=not cut)
        if self.pending is not None and self.pending.item_id == item_id:
            return ItemInfo(item_id, "user", self.pending.text, self.pending.audio is not None, complete=True)
        if reply is None or reply.state in (ReplyState.COMMITTED, ReplyState.FAILED):
            return None
        if _user_item_id(reply) == item_id:
            return ItemInfo(item_id, "user", reply.user.text, reply.user.audio is not None, complete=True)
        return ItemInfo(item_id, "assistant", reply.transcript, reply.frames > 0, complete=False)

    async def _answer(self, metadata: dict[str, str] | None = None) -> None:
        """Start the reply to the pending turn (none: to the conversation as it stands), or take over the one started
        in the silence window."""
        await self._finish_barge_in()  # the interrupted turn joins the history before the next one reads it
        if self.voice is None:
            self.emit(CallError("no_voice", "no voice: set session.audio.output.voice to a voice id from /v1/voices"))
            await self._drop_speculative()
            return
        user, self.pending = self.pending, None
        reply, self.speculative = self.speculative, None
        if reply is None:
            reply = self._launch(user, ReplyState.SPEAKING)
        else:  # the same audio, now committed under its item id
            reply.user, reply.committed_at, reply.vad_window_s = user, self.committed_at, self.vad_window_s
            reply.move(ReplyState.SPEAKING)
        reply.metadata = metadata
        self.reply = self.replies[reply.id] = reply
        self.emit(ReplyStarted(reply.id, reply.item_id, self.last_item_id, metadata))
        self.last_item_id = reply.item_id
        held, reply.held = reply.held, []
        for event in held:
            if isinstance(event, _Ended):
                self._generation_ended(reply, event.outcome, event.reason)
            else:
                self.emit(event)

    def _launch(self, user: UserInput | None, state: ReplyState) -> Reply:
        committed_at = None if user is None else self.committed_at  # no caller turn: no voice-to-voice latency
        reply = Reply(id=_response_id(), item_id=_item_id(), user=user, cursor=self.cursor_factory(),
                      committed_at=committed_at, vad_window_s=self.vad_window_s, state=state)
        reply.task = self._tasks.spawn(self._generate(reply))
        return reply

    async def _start_speculative(self, audio: np.ndarray) -> None:
        await self._drop_speculative()
        user = UserInput("speculative", audio=None, text=None)
        if self.pending is not None:  # earlier commits not yet answered are part of this turn
            user.extend(self.pending)
        user.extend(UserInput("", audio=audio))
        self.speculative = self._launch(user, ReplyState.SPECULATIVE)

    async def _drop_speculative(self) -> None:
        reply, self.speculative = self.speculative, None
        if reply is not None:
            reply.move(ReplyState.DROPPED)
            await cancel_quietly(reply.task)

    async def _generate(self, reply: Reply) -> None:
        """The reply's generation. Cancelled (by whoever moved the reply out of generating), it says nothing."""
        outcome: Outcome = "completed"
        reason = place = None
        try:
            if self.places is not None:
                place = await self.places.admit(self.tenant, "reply")
                place.started()
            session, voice = self.session, self.voice
            reply.plan = self.backend.history.plan(session, reply.user_turn())
            events = self.backend.run_turn(f"turn_{reply.id}", voice, session, reply.plan)
            async with contextlib.aclosing(events):
                async for event in events:
                    self._on_reply_event(reply, event)
        except Exception as error:
            outcome, reason = "failed", error.code if isinstance(error, ChromaError) else "internal_error"
            if isinstance(error, CallerError | CapacityError):  # context_full, no reply place: the call goes on
                self._out(reply, CallError(error.code, error.message))
            if not isinstance(error, ChromaError):
                log.exception("call reply %s failed", reply.id)
            if self.places is not None:
                self.places.note_failure(error)
        finally:
            if place is not None:  # generated (or stopped): the place is free for another reply
                await asyncio.shield(place.release())
        self._generation_ended(reply, outcome, reason)

    def _generation_ended(self, reply: Reply, outcome: Outcome, reason: str | None) -> None:
        """Generation ended on its own: say so, then commit once the caller has heard it, or give the turn back to
        be answered again if it failed."""
        if reply.state is ReplyState.SPECULATIVE:
            reply.held.append(_Ended(outcome, reason))
            return
        reply.move(ReplyState.PLAYING if outcome == "completed" else ReplyState.FAILED)
        self._say_finished(reply, outcome, reason)
        if outcome == "completed":
            self._tasks.spawn(self._settle_after_playback(reply))
            return
        if reply.user is not None:
            if self.pending is not None:
                reply.user.extend(self.pending)
            self.pending = reply.user
        self.reply = None if self.reply is reply else self.reply

    def _say_finished(self, reply: Reply, outcome: Outcome, reason: str | None) -> None:
        reply.outcome, reply.reason = outcome, reason
        prompt = reply.prompt or PromptStats(0)  # a reply that failed before its prompt was counted
        usage = Usage(input_tokens=prompt.prompt_tokens, cached_tokens=prompt.cached_tokens,
                      text_tokens=sum(len(chunk) for _, chunk in reply.tokens), audio_frames=reply.frames)
        self.emit(ReplyFinished(reply.id, reply.item_id, outcome, reason, reply.transcript, reply.metadata, usage))

    def _on_reply_event(self, reply: Reply, event: ReplyEvent) -> None:
        if not reply.generating:  # interrupted: not one more event of it
            return
        if isinstance(event, TextDelta):
            if event.tokens:
                reply.tokens.append((event.at_frame, event.tokens))
            if event.text:
                reply.transcript += event.text
                self._out(reply, ReplyText(reply.id, reply.item_id, event.text))
        elif isinstance(event, AudioChunk):
            reply.audio_started.set()
            frames = round(event.audio.size * 1000 / CODEC_RATE / FRAME_MS)
            reply.frames += frames
            reply.cursor.generated_ms += frames * FRAME_MS
            self._out(reply, ReplyAudio(reply.id, reply.item_id, event.audio))
        elif isinstance(event, TurnDone):
            reply.prompt = event.prompt
            if event.text.startswith(reply.transcript) and event.text != reply.transcript:
                self._out(reply, ReplyText(reply.id, reply.item_id, event.text[len(reply.transcript):]))
                reply.transcript = event.text

    def _out(self, reply: Reply, event: CallEvent) -> None:
        if reply.state is ReplyState.SPECULATIVE:
            reply.held.append(event)
        else:
            self.emit(event)

    # ---- input transcription -----------------------------------------------------------------------------
    async def _transcribe(self, item_id: str, audio: np.ndarray) -> None:
        """What the caller said in a committed item, from its own Reasoner request. It starts once the reply then
        being generated (the one answering this item, started in the same step) has its first audio, so it never
        delays that; the transcript joins the item's history entry, before or after the turn commits."""
        await asyncio.sleep(0)  # the reply to this item starts right after its commit
        reply = self.reply or self.speculative
        if reply is not None and reply.generating and reply.task is not None:
            first_audio = asyncio.ensure_future(reply.audio_started.wait())
            await asyncio.wait([first_audio, reply.task], return_when=asyncio.FIRST_COMPLETED)
            first_audio.cancel()
        transcript = ""
        try:
            deltas = self.backend.transcribe(pcm16_bytes(audio))
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    transcript += delta
                    self.emit(TranscriptionDelta(item_id, delta))
        except ChromaError as error:
            self.emit(TranscriptionFailed(item_id, error.code, error.message))
            return
        except Exception:
            log.exception("transcribing %s failed", item_id)
            self.emit(TranscriptionFailed(item_id, "internal_error", "the transcription failed"))
            return
        self.emit(TranscriptionCompleted(item_id, transcript, audio.size / REASONER_RATE))
        self.transcripts[item_id] = transcript
        await self._record_transcripts([item_id])

    async def _record_transcripts(self, item_ids: list[str]) -> None:
        """Write the finished transcripts of these items into the session's history once the items are in it (the
        turn's commit and the transcription each call this after their own step: whichever is last writes)."""
        history = {m.id: m for m in self.session.history} if self.session else {}
        for item_id in item_ids:
            if item_id in history and item_id in self.transcripts:
                transcript = self.transcripts.pop(item_id)
                history[item_id].transcript = transcript  # the call's copy; the store's is written next
                with contextlib.suppress(NotFound, Conflict):  # deleted meanwhile, the session expired, or contended
                    await self.state.set_transcript(self.tenant, self.session.id, item_id, transcript)

    # ---- what the protocol reports -----------------------------------------------------------------------
    def audio_sent(self, reply_id: str, ms: float) -> float:
        """The protocol handed `ms` of the reply's audio to the transport; returns the reply's ms sent so far."""
        reply = self.replies[reply_id]
        first, underruns = reply.cursor.first_sent_at is None, reply.cursor.underruns
        reply.cursor.sent(ms)
        if first and reply.committed_at is not None:
            self.metrics.observe_voice_to_voice(time.monotonic() - reply.committed_at, reply.vad_window_s)
        if reply.cursor.underruns > underruns:
            self.metrics.count_underrun()
        return reply.cursor.sent_ms

    def may_play(self, reply_id: str) -> bool:
        """Whether audio of the reply still queued at the protocol may go out (not once it was interrupted)."""
        return self.replies[reply_id].state is not ReplyState.INTERRUPTED

    def mark_acked(self, reply_id: str, played_ms: float, drained: bool) -> None:
        """The far end played `played_ms` of the reply; `drained`: nothing else is queued for it to play."""
        reply = self.replies[reply_id]
        reply.cursor.report_played(played_ms)
        if drained and reply.state is ReplyState.SPEAKING:
            self.metrics.count_underrun()  # it played everything, and the reply was not done

    def playback_stopped(self, reply_id: str) -> None:
        """After a barge-in (`PlaybackStopped`): the far end plays nothing more of the reply."""
        self.replies[reply_id].far_end_stopped.set()

    # ---- ending replies ----------------------------------------------------------------------------------
    def _interrupt(self, reply: Reply, reason: str) -> None:
        """No more of the reply goes out from this moment; a generation still running is told to stop."""
        generating = reply.state is ReplyState.SPEAKING
        reply.move(ReplyState.INTERRUPTED)
        if generating:
            self._say_finished(reply, "cancelled", reason)
            reply.task.cancel()

    async def _barge_in(self, reply: Reply, started: float) -> None:
        """Once the reply was interrupted: wait for its generation to stop and the far end's playback with it, then
        commit what was heard up to that moment."""
        await cancel_quietly(reply.task)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reply.far_end_stopped.wait(), PLAYBACK_STOP_WAIT_S)
        self.metrics.observe_barge_in(time.monotonic() - started)
        await self._settle(reply)

    async def _finish_barge_in(self) -> None:
        task, self._interrupting = self._interrupting, None
        if task is not None:
            with contextlib.suppress(Exception):  # its own errors were reported as it ran
                await asyncio.wait_for(asyncio.shield(task), PLAYBACK_STOP_WAIT_S + 10)

    async def _stop(self, reply: Reply, reason: str) -> None:
        """Stop a reply now (client cancel, truncation, hang-up) and commit the turn with what the caller heard."""
        if reply.audible:
            self._interrupt(reply, reason)
        await cancel_quietly(reply.task)
        await self._settle(reply)

    async def _settle_after_playback(self, reply: Reply) -> None:
        await reply.cursor.wait_played(reply.cursor.generated_ms)
        await self._settle(reply)

    async def _settle(self, reply: Reply) -> None:
        """Commit the reply's turn with the text the caller heard: once, then revise it if they heard less."""
        if self.reply is reply:
            self.reply = None
        async with reply.settling:
            committed = reply.state is ReplyState.COMMITTED
            if reply.state is ReplyState.FAILED or (committed and reply.cursor.reported_ms is None):
                return
            text = self._heard_text(reply)
            try:
                if not committed:
                    user, session, plan = reply.user_turn(), self.session, reply.plan
                    audio, user_text, user_id = (None, None, None) if user is None else (user.audio, user.text, user.id)
                    self.session = await self.state.append_turn(
                        self.tenant, session.id, audio, text, session.version, user_text=user_text,
                        ids=(user_id, reply.item_id), positions=self._positions(reply, user, text),
                        drop=None if plan is None else plan.drop,
                    )
                    reply.committed_version = self.session.version
                    reply.move(ReplyState.COMMITTED)
                    await self._record_transcripts([] if user_id is None else [user_id])
                    for item_id in [] if plan is None else plan.drop.messages:
                        self.emit(ItemDeleted(item_id))
                elif text != reply.committed_text:
                    self.session = await self.state.revise_reply(self.tenant, self.session.id, reply.committed_version,
                                                                 reply.item_id, text,
                                                                 self._positions(reply, None, text)[1])
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
        everything = reply.outcome == "completed" and heard >= reply.frames
        tokens = [t for frame, chunk in reply.tokens if everything or frame < heard for t in chunk]
        return self.processor.decode_text(tokens)

    # ---- plumbing ----------------------------------------------------------------------------------------
    def emit(self, event: CallEvent) -> None:
        if not self._closed:
            self.queue.put_nowait(event)

    async def events(self) -> AsyncIterator[CallEvent]:
        while (event := await self.queue.get()) is not None:
            yield event

    async def close(self) -> None:
        """The call ended (hang-up, disconnect, a limit): stop everything, free every slot, and commit what the
        caller heard of the last reply."""
        await self._drop_speculative()
        await self._finish_barge_in()
        if self.reply is not None:
            await self._stop(self.reply, "call_ended")
        await self._tasks.cancel_all()
        self._closed = True
        self.queue.put_nowait(None)


def _user_item_id(reply: Reply) -> str | None:
    return None if reply.user is None else reply.user.item_id


def _item_id() -> str:
    return f"item_{uuid.uuid4().hex[:24]}"


def _response_id() -> str:
    return f"resp_{uuid.uuid4().hex[:24]}"
