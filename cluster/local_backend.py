"""`LocalTurnBackend`: the API's TurnBackend in one process, no Ray (`chroma-serve up` on a laptop, and the tests).

Thinker (`HFReasoner`) -> speech (`SpeechEngine`, continuous batching) -> codec (`CodecEngine`, streaming
decode). Everything the codec engine does (voice encoding, push/step/close/cancel) runs on one worker thread,
in order, because the engine has a single owner; decoded chunks of other turns that a step produced wait in
their turn's buffer until that turn next asks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.api import AudioChunk, TextDelta, TurnDone
from cluster.state import Session, Voice
from model.checkpoint import Checkpoint, load_codec, load_speech, load_thinker, resolve_dtype
from model.codec_engine import CodecCapacityError, CodecEngine
from model.generate import VoicePrompt, thinker_tokens_for
from model.processor import ChromaProcessor, Conversation, Turn
from model.reasoner import HFReasoner, Reasoner
from model.speech_engine import CapacityError, SpeechEngine, SpeechEngineSettings

CALLER_RATE = 16000



class LocalBackendSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHROMA_LOCAL_")

    dtype: str = "float32"
    device: str = "cpu"
    max_slots: int = Field(4, ge=1, description="live turns in the speech engine")
    max_queue: int = Field(8, ge=0, description="turns waiting for a speech slot")
    max_frames: int = Field(750, ge=1, description="frame limit per turn")
    max_tokens: int = Field(256, ge=1, description="thinker token limit per turn")
    chunk_frames: int = Field(2, ge=1, description="frames per streamed codec chunk (2 = 160 ms)")


class LocalTurnBackend:
    def __init__(
        self, reasoner: Reasoner, speech: SpeechEngine, codec: CodecEngine, settings: LocalBackendSettings | None = None
    ):
        self.reasoner = reasoner
        self.processor: ChromaProcessor = reasoner.processor
        self.speech = speech
        self.codec = codec
        self.settings = settings or LocalBackendSettings()
        self._codec_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec-engine")
        self._decoded: dict[str, list[torch.Tensor]] = {}  # touched only on the codec worker
        self._closed = False

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, settings: LocalBackendSettings | None = None, reasoner: Reasoner | None = None
    ) -> LocalTurnBackend:
        """`reasoner`: e.g. a VLLMReasoner on the checkpoint's thinker; default a transformers one."""
        settings = settings or LocalBackendSettings()
        checkpoint = Checkpoint(path)
        dtype = resolve_dtype(settings.dtype)
        if reasoner is None:
            reasoner = HFReasoner(load_thinker(checkpoint, dtype, settings.device), ChromaProcessor.from_pretrained(path))
        speech = SpeechEngine(
            load_speech(checkpoint, dtype, settings.device),
            SpeechEngineSettings(max_slots=settings.max_slots, max_queue=settings.max_queue, max_frames=settings.max_frames),
        )
        # A stream per admitted or queued turn, so a turn the speech engine took always gets one.
        codec = CodecEngine(
            load_codec(checkpoint, dtype, settings.device), checkpoint.config,
            max_streams=settings.max_slots + settings.max_queue, chunk_frames=settings.chunk_frames,
        )
        return cls(reasoner, speech, codec, settings)

    # ---- TurnBackend ------------------------------------------------------------------------------------
    async def ready(self) -> bool:
        return not self._closed

    async def encode_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> tuple[list[int], np.ndarray, int]:
        prompt = self.processor.encode_voice_prompt(transcript, audio, sample_rate)  # ValueError for bad input
        voice = await self._on_codec(
            self.codec.encode_voice, prompt.text_ids[0], prompt.input_values, prompt.num_samples
        )
        return voice.transcript_ids.tolist(), voice.codes.numpy(), voice.valid_frames

    async def run_turn(
        self, turn_id: str, voice: Voice, session: Session, history_audio: list[bytes | None],
        user_audio_16k: np.ndarray, *, max_tokens: int | None = None, max_frames: int | None = None,
    ) -> AsyncIterator[TextDelta | AudioChunk | TurnDone]:
        started = time.perf_counter()
        conversation = build_conversation(session, history_audio, user_audio_16k)
        prompt = voice_prompt(voice)
        max_tokens = min(max_tokens or self.settings.max_tokens, thinker_tokens_for(max_frames or self.settings.max_frames))
        thinker = self.reasoner.stream(conversation, max_tokens)
        try:
            frames = await self.speech.submit(turn_id, prompt, thinker, sampling=session.sampling, max_frames=max_frames)
        except BaseException:
            await thinker.aclose()
            raise
        codec_open = False
        finished = False
        try:
            try:
                await self._on_codec(self._open_stream, turn_id)
            except CodecCapacityError as exc:
                raise CapacityError(str(exc)) from exc
            codec_open = True
            text = IncrementalText(self.processor)
            count = 0
            first_audio = None
            async for frame in frames:
                if delta := text.add(frame.text_tokens):
                    yield TextDelta(delta)
                if frame.codes is None:
                    continue
                count += 1
                codes = torch.tensor([frame.codes], dtype=torch.long)
                for pcm in await self._on_codec(self._push_and_step, turn_id, codes):
                    first_audio = first_audio or time.perf_counter()
                    yield AudioChunk(pcm.numpy())
            codec_open = False
            for pcm in await self._on_codec(self._close_stream, turn_id):
                first_audio = first_audio or time.perf_counter()
                yield AudioChunk(pcm.numpy())
            for event in closing_events(text, count, started, first_audio):
                yield event
            finished = True
        finally:
            # No awaits here: this also runs when the consumer's task is being cancelled.
            self.speech.cancel(turn_id)  # no-op once finished; its pump then closes the thinker stream
            if codec_open:
                self._codec_worker.submit(self._cancel_stream, turn_id)
            if not finished:
                asyncio.ensure_future(_close_quietly(frames))

    async def close(self) -> None:
        self._closed = True
        await self.speech.close()
        await self.reasoner.close()
        self._codec_worker.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        return {"speech": self.speech.stats(), "codec": self.codec.stats()}

    # ---- codec worker -----------------------------------------------------------------------------------
    async def _on_codec(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._codec_worker, fn, *args)

    def _open_stream(self, turn_id: str) -> None:
        self.codec.open_stream(turn_id)
        self._decoded[turn_id] = []

    def _push_and_step(self, turn_id: str, codes: torch.Tensor) -> list[torch.Tensor]:
        self.codec.push(turn_id, codes)
        while out := self.codec.step():
            for other, pcm in out.items():
                if other in self._decoded:
                    self._decoded[other].append(pcm)
            if turn_id not in out:
                break
        chunks, self._decoded[turn_id] = self._decoded[turn_id], []
        return chunks

    def _close_stream(self, turn_id: str) -> list[torch.Tensor]:
        tail = self.codec.close(turn_id, flush=True)
        chunks = self._decoded.pop(turn_id, [])
        return chunks + ([tail] if tail is not None else [])

    def _cancel_stream(self, turn_id: str) -> None:
        self._decoded.pop(turn_id, None)
        try:
            self.codec.cancel(turn_id)
        except KeyError:
            pass  # closed meanwhile


async def _close_quietly(iterator) -> None:
    try:
        await iterator.aclose()
    except Exception:
        pass


def build_conversation(session: Session, history_audio: list[bytes | None], user_audio_16k: np.ndarray) -> Conversation:
    """The session's system prompt, its history (caller audio at 16 kHz, reply text) and the new caller audio."""
    turns = []
    for entry, audio in zip(session.history, history_audio):
        if entry.role == "user":
            wave = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
            turns.append(Turn("user", audio=wave, sample_rate=CALLER_RATE))
        elif entry.text:  # a reply with no words leaves nothing for the thinker to read
            turns.append(Turn("assistant", text=entry.text))
    turns.append(Turn("user", audio=np.asarray(user_audio_16k, dtype=np.float32), sample_rate=CALLER_RATE))
    return Conversation(session.system_prompt, turns)


def voice_prompt(voice: Voice) -> VoicePrompt:
    return VoicePrompt(
        transcript_ids=torch.tensor(voice.transcript_ids, dtype=torch.long),
        codes=torch.from_numpy(voice.codes_array()),
        valid_frames=voice.valid_frames,
    )


class IncrementalText:
    """A reply's thinker tokens -> text deltas as they arrive (im_end and other special tokens dropped)."""

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


def closing_events(text: IncrementalText, frames: int, started: float, first_audio: float | None) -> list[TextDelta | TurnDone]:
    """The end of a reply: its last text delta, if any, then TurnDone with the turn's timings."""
    events: list[TextDelta | TurnDone] = [TextDelta(delta)] if (delta := text.finish()) else []
    timings = {"total_s": time.perf_counter() - started}
    if first_audio is not None:
        timings["first_audio_s"] = first_audio - started
    return events + [TurnDone(frames=frames, text=text.text, timings=timings)]
