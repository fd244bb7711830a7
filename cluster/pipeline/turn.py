"""What a turn is between the API and the engines, for both the one-process backend and the Ray deployments.

A turn flows through three stages, each consuming the one before it as it streams:

    Reasoner.stream(conversation, max_tokens)      (token id, hidden state) pairs
      -> speech_frames(SpeechEngine, request, pairs)   groups of GeneratedFrame
      -> CodecLoop.decode(turn_id, groups)             ReplyChunk (text tokens, PCM)
      -> reply_events(processor, chunks)               TextDelta / AudioChunk, then one TurnDone

In one process (`cluster.pipeline.local`) the stages are direct calls; in the cluster each one is a Serve
deployment and the arrows are streaming handle calls (`deployments/`). This module also builds the request:
the conversation from the session, and the token budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cluster.state.store import Session, Voice
from model.chroma.sampling import SamplingParams
from model.chroma.turn import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_TOKENS,
    GeneratedFrame,
    ReasonerPair,
    ReplyChunk,
    VoicePrompt,
    reasoner_tokens_for,
)
from model.engines.speech import SpeechEngine
from model.processing.audio import REASONER_RATE, pcm16_wave
from model.processing.processor import ChromaProcessor, Conversation, Message, VoicePromptInputs


class TurnSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_frames: int = Field(DEFAULT_MAX_FRAMES, ge=1, description="reply frame limit (12.5 frames per second)")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, description="Reasoner token limit per reply")


@dataclass
class TurnRequest:
    """Everything the stages need for one reply (it travels through Ray as one object)."""

    turn_id: str
    voice: VoicePrompt
    conversation: Conversation
    sampling: SamplingParams
    max_frames: int
    max_tokens: int  # already capped by what `max_frames` frames can speak


def build_turn_request(
    turn_id: str, voice: Voice, session: Session, history_audio: list[bytes | None], user: Message,
    settings: TurnSettings,
) -> TurnRequest:
    """`history_audio` is `StateStore.load_history_audio(session)`; `user` is the caller's new message."""
    return TurnRequest(
        turn_id=turn_id,
        voice=voice_prompt(voice),
        conversation=build_conversation(session, history_audio, user),
        sampling=session.sampling,
        max_frames=settings.max_frames,
        max_tokens=min(settings.max_tokens, reasoner_tokens_for(settings.max_frames)),
    )


def build_conversation(session: Session, history_audio: list[bytes | None], user: Message) -> Conversation:
    """The session's system prompt, its history (caller audio or text, reply text) and the new user message."""
    messages = []
    for entry, audio in zip(session.history, history_audio):
        if entry.role == "user":
            spoken = audio is not None
            messages.append(Message("user", text=entry.text, audio=pcm16_wave(audio) if spoken else None,
                                    sample_rate=REASONER_RATE if spoken else None))
        elif entry.text:  # a reply with no words leaves nothing for the Reasoner to read
            messages.append(Message("assistant", text=entry.text))
    return Conversation(session.system_prompt, [*messages, user])


def caller_message(audio: np.ndarray) -> Message:
    """The caller's utterance (float32 at REASONER_RATE) as the conversation's new user message."""
    return Message("user", audio=np.asarray(audio, dtype=np.float32), sample_rate=REASONER_RATE)


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
    engine: SpeechEngine, request: TurnRequest, pairs: AsyncIterator[ReasonerPair], group_size: int = 1
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


async def reply_events(processor: ChromaProcessor, chunks: AsyncIterator[ReplyChunk]) -> AsyncIterator[ReplyEvent]:
    """The codec's chunks as API events: text deltas and audio as they come, then TurnDone with the figures.
    Closing this closes `chunks`, which cancels the turn down to the Reasoner."""
    started = time.perf_counter()
    text, frames, first_audio = IncrementalText(processor), 0, None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
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
    yield TurnDone(frames=frames, text=text.text, timings=timings)


@dataclass
class StageStatus:
    """One stage as the API sees it: whether it takes new turns now, and how many it holds at once across its live
    replicas (what the engines say they keep real-time, at most their slots: model.engines.realtime; None: this
    stage sets no bound)."""

    name: str
    ready: bool
    capacity: int | None = None
    replicas: int = 1
    problem: str = ""  # why it is not ready, in words fit for a client (no internals)

    @classmethod
    def of(cls, name: str, slots: int | None, replicas: int = 1, problem: str = "") -> StageStatus:
        """`replicas` live replicas of `slots` each; not ready when there is a problem or no replica."""
        problem = problem or ("" if replicas else "no live replica")
        if problem:
            return cls(name, False, 0, replicas, problem)
        return cls(name, True, None if slots is None else slots * replicas, replicas)

    def down(self, problem: str) -> StageStatus:
        """This stage taken as not ready, for `problem`."""
        return StageStatus.of(self.name, None, self.replicas, problem)


STAGES = ("Reasoner", "SpeechStack", "Codec")  # every turn holds one place in each


@runtime_checkable
class TurnBackend(Protocol):
    """What the API drives: `cluster.pipeline.local.LocalTurnBackend` in one process, the Ray deployments in the
    cluster (`deployments.ingress.RayTurnBackend`)."""

    processor: ChromaProcessor

    async def clone_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePrompt:
        """The voice prompt of a reference clip (any rate). InvalidInput / AudioError for unusable input."""
        ...

    def run_turn(
        self, turn_id: str, voice: Voice, session: Session, history_audio: list[bytes | None], user: Message
    ) -> AsyncIterator[ReplyEvent]:
        """Text deltas and audio chunks as they are produced, then exactly one TurnDone. Closing the iterator
        cancels the turn and frees its engine slots. CapacityError when full."""
        ...

    async def stages(self) -> list[StageStatus]:
        """Every stage's readiness and capacity, as of now (fast: the API polls it)."""
        ...
