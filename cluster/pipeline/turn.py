"""What a turn is between the API and the engines, for both the one-process backend and the Ray deployments.

A turn flows through three stages, each consuming the one before it as it streams:

    reasoner_pairs(Reasoner, ReasonerPrompt)           (token id, hidden state) pairs
      -> speech_frames(SpeechEngine, request, pairs)   groups of GeneratedFrame
      -> CodecLoop.decode(turn_id, groups)             ReplyChunk (text tokens, PCM)
      -> reply_events(processor, chunks)               TextDelta / AudioChunk, then one TurnDone

In one process (`cluster.pipeline.local`) the stages are direct calls; in the cluster each one is a Serve
deployment and the arrows are streaming handle calls (`deployments/`). Each stage gets what it reads: the Codec
and the SpeechStack a `SpeechRequest` (turn id, voice, sampling, limits), the Reasoner alone the conversation
(`ReasonerPrompt`), which the Ingress hands over once, by reference (`ReasonerCall`). The prompt carries the
history by reference too: its caller audio stays in Redis, and a Reasoner reads only what it does not hold
already (`reasoner_pairs`). The Reasoner's `PromptStats` ride up the streams to the turn's `TurnDone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cluster.admission.stages import StageStatus
from cluster.pipeline.history import HistoryPolicy, TurnPlan, UserTurn
from cluster.settings.turns import TurnSettings
from cluster.state.store import HistoryMessage, Session, Voice
from model.chroma.sampling import SamplingParams
from model.chroma.turn import GeneratedFrame, ReasonerPair, ReplyChunk, VoicePrompt
from model.engines.speech import SpeechEngine
from model.errors import InternalError
from model.processing.audio import REASONER_RATE, pcm16_wave
from model.processing.processor import ChromaProcessor, Conversation, Message, VoicePromptInputs
from model.reasoner.base import AudioNotHeld, PromptStats, Reasoner


@dataclass
class ReasonerPrompt:
    """A turn's conversation as the Reasoner reads it: the history as its messages (their caller audio by item id,
    digest and length: it stays in Redis under the session) and the new message itself."""

    tenant: str
    session_id: str
    system_prompt: str
    history: list[HistoryMessage]
    user: UserTurn | None  # None: the reply answers the history as it stands
    max_tokens: int
    next_history: list[HistoryMessage] | None = None  # the plan's: what the next turn reads, where it drops ahead


@dataclass
class ReasonerCall:
    """How the SpeechStack asks the Reasoner for a turn's pairs."""

    session_id: str  # routes a session's turns to the Reasoner replica that holds its prefix (deployments/routing.py)
    prompt: Any  # the ReasonerPrompt; in the cluster a Ray object reference to it, put once by the Ingress


@dataclass
class SpeechRequest:
    """What the Codec and the SpeechStack read for one reply (no conversation: that reaches the Reasoner alone)."""

    turn_id: str
    voice: VoicePrompt
    sampling: SamplingParams
    max_frames: int
    reasoner: ReasonerCall


def build_turn_request(turn_id: str, voice: Voice, session: Session, plan: TurnPlan, settings: TurnSettings) -> SpeechRequest:
    """The request of a turn planned by `HistoryPolicy.plan`."""
    prompt = ReasonerPrompt(session.tenant, session.id, session.system_prompt, plan.history, plan.user,
                            settings.reply_tokens(), plan.next_history)
    return SpeechRequest(turn_id, voice_prompt(voice), session.sampling, settings.max_frames,
                         ReasonerCall(session.id, prompt))


class AudioSource(Protocol):
    """Where a Reasoner reads the history's caller audio it does not hold: `StateStore`."""

    async def load_audio(self, tenant: str, session_id: str, item_ids: list[str]) -> dict[str, bytes]: ...


def history_message(message: HistoryMessage, audio: bytes | None = None, held: bool = False) -> Message | None:
    """A history message as the Reasoner reads it: its caller audio given (`audio`, 16 kHz PCM16) or held by the
    Reasoner under its digest; None for a caller message that leaves nothing to read. A reply with no words stays,
    empty, as the thinker ended it: the next prompt then extends the last one, which the prefix cache serves."""
    if message.role != "user":  # a reply, or a client's system or assistant message: text only
        return Message(message.role, text=message.text or "")
    if not message.audio_bytes:
        return Message("user", text=message.text) if message.text else None
    if audio is not None:
        return Message("user", text=message.text, audio=pcm16_wave(audio), sample_rate=REASONER_RATE,
                       audio_id=message.audio_id)
    if not held:
        raise InternalError(f"the caller audio of history message {message.id} was neither given nor held")
    return Message("user", text=message.text, audio_samples=message.audio_samples, audio_id=message.audio_id)


def next_conversation(prompt: ReasonerPrompt) -> Conversation:
    """What the next turn's prompt starts with where the plan drops ahead: the history it will read, this turn's
    message (if any) and the generation prompt (the start of this turn's reply), every caller audio by id."""
    messages = [history_message(m, held=True) for m in prompt.next_history or []]
    return _conversation(prompt, messages, held=True)


def _conversation(prompt: ReasonerPrompt, history: list[Message | None], held: bool = False) -> Conversation:
    """The prompt's history (None: a message that leaves nothing to read), then its new message if it has one."""
    messages = [m for m in history if m is not None]
    return Conversation(prompt.system_prompt, messages if prompt.user is None else [*messages, prompt.user.message(held)])


def build_conversation(session: Session, history_audio: list[bytes | None], user: Message) -> Conversation:
    """The session's system prompt, its history with all its caller audio (`StateStore.load_history_audio`) and
    the new user message: the conversation the offline reference answers."""
    messages = [history_message(m, audio) for m, audio in zip(session.history, history_audio)]
    return Conversation(session.system_prompt, [*(m for m in messages if m is not None), user])


async def reasoner_pairs(
    reasoner: Reasoner, prompt: ReasonerPrompt, audio: AudioSource | None,
    on_prompt: Callable[[PromptStats], None] | None = None,
) -> AsyncIterator[ReasonerPair]:
    """The Reasoner stage: the prompt's pairs. History audio the Reasoner holds (by digest) goes by id; the rest is
    read from `audio`, and read again only if the engine let go of what it held (AudioNotHeld). Once the reply's
    text is complete, a plan that drops ahead has the Reasoner warm the next turn's prompt (`Reasoner.warm`)."""
    given: dict[str, bytes] = {}
    im_end, warmed = reasoner.processor.special_ids.im_end, False

    def warm() -> None:
        nonlocal warmed
        if prompt.next_history is not None and not warmed:
            warmed = True
            reasoner.warm(next_conversation(prompt))

    let_go: set[str] = set()

    def held(message: HistoryMessage) -> bool:
        return message.audio_id is not None and message.audio_id not in let_go and reasoner.holds_audio(message.audio_id)

    for _ in range(2):
        missing = [m.id for m in prompt.history
                   if m.role == "user" and m.audio_bytes and m.id not in given and not held(m)]
        if missing:
            if audio is None:
                raise InternalError("the Reasoner has no state store to read the history's caller audio from")
            given.update(await audio.load_audio(prompt.tenant, prompt.session_id, missing))
        messages = [history_message(m, given.get(m.id), held(m)) for m in prompt.history]
        conversation = _conversation(prompt, messages)
        try:
            async for pair in reasoner.stream(conversation, prompt.max_tokens, on_prompt):
                if pair[0] == im_end:
                    warm()  # before the pair: its consumer may close the stream on it
                yield pair
            warm()  # the reply ran to its token budget
            return
        except AudioNotHeld as error:  # raised before any pair: nothing was streamed yet
            let_go.update(error.ids)
    raise InternalError("the Reasoner let go of the history's audio twice in one turn")


TRANSCRIBE_SYSTEM = "You are a speech recognition model."
TRANSCRIBE_ASK = "Transcribe the audio into text, word for word, in the language spoken."


async def transcript_deltas(reasoner: Reasoner, audio: bytes, max_tokens: int) -> AsyncIterator[str]:
    """The caller's words in `audio` (16 kHz PCM16), as text deltas: the thinker prompted as a speech recogniser, in
    a request of its own beside the reply's (its hidden states go unused)."""
    conversation = Conversation(TRANSCRIBE_SYSTEM, [Message("user", text=TRANSCRIBE_ASK, audio=pcm16_wave(audio),
                                                            sample_rate=REASONER_RATE)])
    im_end, text = reasoner.processor.special_ids.im_end, IncrementalText(reasoner.processor)
    async with contextlib.aclosing(reasoner.stream(conversation, max_tokens)) as pairs:
        async for token, _ in pairs:
            if token == im_end:
                break
            if delta := text.add([token]):
                yield delta
    if delta := text.finish():
        yield delta


def voice_prompt(voice: Voice) -> VoicePrompt:
    return VoicePrompt(
        transcript_ids=torch.tensor(voice.transcript_ids, dtype=torch.long),
        codes=torch.from_numpy(voice.codes_array()),
        valid_frames=voice.valid_frames,
    )


async def clone_voice(
    processor: ChromaProcessor, encode: Callable[[VoicePromptInputs], Awaitable[VoicePrompt]],
    transcript: str, audio: np.ndarray, sample_rate: int,
) -> VoicePrompt:
    """Tokenise the transcript and resample the reference (InvalidInput for unusable input), then Mimi-encode."""
    inputs = await asyncio.to_thread(processor.encode_voice_prompt, transcript, audio, sample_rate)
    return await encode(inputs)


async def speech_frames(
    engine: SpeechEngine, request: SpeechRequest, pairs: AsyncIterator[ReasonerPair], group_size: int = 1
) -> AsyncIterator[list[GeneratedFrame]]:
    """The speech stage: frames in groups of `group_size` with codes (the last may be shorter). The codec
    decodes in chunks of its own size anyway, so grouping frames to it halves the messages between stages."""
    frames = await engine.submit(request.turn_id, request.voice, pairs, request.sampling, request.max_frames)
    group: list[GeneratedFrame] = []
    async with contextlib.aclosing(frames):  # leaving early cancels the turn and frees its slot
        async for frame in frames:
            group.append(frame)
            if sum(f.codes is not None for f in group) >= group_size:
                yield group
                group = []
    if group:
        yield group


async def peel(items: AsyncIterator, kind: type, found: list) -> AsyncIterator:
    """`items` without those of type `kind`, which go to `found`: a value riding on a stream past a stage that
    consumes it (the Reasoner's PromptStats, past the SpeechEngine and the CodecLoop)."""
    async with contextlib.aclosing(items):
        async for item in items:
            if isinstance(item, kind):
                found.append(item)
            else:
                yield item


async def surfaced(items: AsyncIterator, found: list) -> AsyncIterator:
    """`items`, each preceded by what has come into `found` meanwhile (what `peel` took off upstream)."""
    async with contextlib.aclosing(items):
        async for item in items:
            while found:
                yield found.pop(0)
            yield item
    while found:
        yield found.pop(0)


# ---- the reply as the API streams it ------------------------------------------------------------------
@dataclass
class TextDelta:
    text: str  # may be empty while a multi-byte character is incomplete
    tokens: list[int] = field(default_factory=list)  # the Reasoner tokens behind it
    at_frame: int = 0  # the reply frame they entered with: heard once that frame has played


@dataclass
class AudioChunk:
    audio: np.ndarray  # float32 mono at CODEC_RATE


@dataclass
class TurnDone:
    frames: int
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    prompt: PromptStats | None = None  # the Reasoner's prompt: its positions and what its prefix cache served
    shipped: dict[str, int] = field(default_factory=dict)  # bytes of the turn's request each stage received


ReplyEvent = TextDelta | AudioChunk | TurnDone


class IncrementalText:
    """A reply's Reasoner tokens -> text deltas as they arrive (im_end and other special tokens dropped)."""

    def __init__(self, processor: ChromaProcessor):
        self.processor = processor
        self.tokens: list[int] = []
        self.text = ""

    def add(self, tokens: list[int]) -> str:
        self.tokens += tokens
        decoded = self.processor.decode_text(self.tokens)
        # Hold back a partial UTF-8 sequence (shown as U+FFFD) until its next byte arrives.
        if decoded.endswith("\ufffd") or not decoded.startswith(self.text):
            return ""
        return self._advance(decoded)

    def finish(self) -> str:
        decoded = self.processor.decode_text(self.tokens)
        return self._advance(decoded) if decoded.startswith(self.text) else ""

    def _advance(self, decoded: str) -> str:
        delta, self.text = decoded[len(self.text):], decoded
        return delta


async def reply_events(
    processor: ChromaProcessor, chunks: AsyncIterator[ReplyChunk | PromptStats], shipped: dict[str, int] | None = None,
) -> AsyncIterator[ReplyEvent]:
    """The codec's chunks as API events: text deltas and audio as they come, then TurnDone with the figures.
    Closing this closes `chunks`, which cancels the turn down to the Reasoner."""
    started = time.perf_counter()
    text, frames, first_audio, prompt = IncrementalText(processor), 0, None, None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if isinstance(chunk, PromptStats):
                prompt = chunk
                continue
            if chunk.text_tokens:
                yield TextDelta(text.add(chunk.text_tokens), chunk.text_tokens, chunk.text_at_frame)
            if chunk.audio is not None:
                frames += chunk.frames
                first_audio = first_audio or time.perf_counter()
                yield AudioChunk(chunk.audio)
    if delta := text.finish():
        yield TextDelta(delta)
    timings = {"total_s": time.perf_counter() - started}
    if first_audio is not None:
        timings["first_audio_s"] = first_audio - started
    yield TurnDone(frames=frames, text=text.text, timings=timings, prompt=prompt, shipped=shipped or {})


STAGES = ("Reasoner", "SpeechStack", "Codec")  # every turn holds one place in each


@runtime_checkable
class TurnBackend(Protocol):
    """What the API drives: `cluster.pipeline.local.LocalTurnBackend` in one process, the Ray deployments in the
    cluster (`deployments.ingress.RayTurnBackend`)."""

    processor: ChromaProcessor
    history: HistoryPolicy  # plans each turn's prompt: `run_turn` takes its TurnPlan

    async def clone_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePrompt:
        """The voice prompt of a reference clip (any rate). InvalidInput / AudioError for unusable input."""
        ...

    def run_turn(self, turn_id: str, voice: Voice, session: Session, plan: TurnPlan) -> AsyncIterator[ReplyEvent]:
        """Text deltas and audio chunks as they are produced, then exactly one TurnDone. Closing the iterator
        cancels the turn and frees its engine slots. CapacityError when full."""
        ...

    async def stages(self) -> list[StageStatus]:
        """Every stage's readiness and capacity, as of now (fast: the API polls it)."""
        ...

    def transcribe(self, audio: bytes) -> AsyncIterator[str]:
        """What the caller said in `audio` (16 kHz PCM16), as text deltas from the Reasoner (`transcript_deltas`).
        Closing the iterator releases its request."""
        ...
