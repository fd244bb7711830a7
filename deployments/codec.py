"""Serve deployment of the codec: voice encoding, and streaming Mimi decode of every live turn per replica.

A reply pulls its frames from the SpeechStack as they are generated; one stepping task per replica decodes
the ready chunks of all turns in one batched forward (CodecEngine) and hands each turn its own PCM.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from model.checkpoint import Checkpoint, load_codec, resolve_dtype
from model.codec_engine import CodecEngine
from model.generate import VoicePrompt
from model.processor import Conversation
from model.sampling import SamplingParams


@dataclass
class ReplyChunk:
    """One event of a streamed reply: text tokens, and/or PCM (float32 at the codec rate), and a frame count."""

    text_tokens: list[int]
    audio: np.ndarray | None
    frames: int


@serve.deployment(name="Codec")
class CodecDeployment:
    def __init__(self, checkpoint: str, speech: DeploymentHandle, max_streams: int = 64, chunk_frames: int = 2,
                 dtype: str = "float32", device: str = "cpu"):
        loaded = Checkpoint(checkpoint)
        self.config = loaded.config
        codec = load_codec(loaded, resolve_dtype(dtype), device)
        self.engine = CodecEngine(codec, self.config, max_streams=max_streams, chunk_frames=chunk_frames)
        self.speech = speech
        self.outputs: dict[str, asyncio.Queue] = {}
        self._stepper: asyncio.Task | None = None
        self._wake_stepper = asyncio.Event()  # set when frames arrive or a reply ends

    async def encode_voice(self, transcript_ids: list[int], audio_24k: np.ndarray) -> VoicePrompt:
        return self.engine.encode_voice(torch.tensor(transcript_ids), torch.from_numpy(audio_24k))

    async def reply(self, turn_id: str, voice: VoicePrompt, conversation: Conversation,
                    sampling: SamplingParams | None, max_frames: int, max_tokens: int):
        frames = self.speech.options(stream=True).generate.remote(
            turn_id, voice, conversation, sampling, max_frames, max_tokens, self.engine.chunk_frames
        )
        self.engine.open_stream(turn_id)
        queue = self.outputs[turn_id] = asyncio.Queue()
        feeder = asyncio.create_task(self._feed(turn_id, frames, queue))
        self._ensure_stepping()
        try:
            while (chunk := await queue.get()) is not None:
                if isinstance(chunk, BaseException):
                    raise chunk
                yield chunk
        finally:
            feeder.cancel()
            frames.cancel()  # a caller who left stops the speech stack and, through it, the Reasoner
            self.outputs.pop(turn_id, None)
            self._wake_stepper.set()  # the stepper stops once no reply is left
            with contextlib.suppress(KeyError):  # already closed when the reply ran to its end
                self.engine.cancel(turn_id)

    async def _feed(self, turn_id: str, frames, queue: asyncio.Queue) -> None:
        try:
            async for group in frames:
                codes = [frame.codes for frame in group if frame.codes is not None]
                if codes:
                    self.engine.push(turn_id, torch.tensor(codes))
                    self._wake_stepper.set()
                if text_tokens := [t for frame in group for t in frame.text_tokens]:
                    queue.put_nowait(ReplyChunk(text_tokens, None, 0))
            tail = self.engine.close(turn_id)
            if tail is not None and tail.numel():
                queue.put_nowait(self._audio_chunk(tail))
            queue.put_nowait(None)
        except Exception as error:
            queue.put_nowait(error)

    def stats(self) -> dict:
        return self.engine.stats()

    def _audio_chunk(self, pcm: torch.Tensor) -> ReplyChunk:
        return ReplyChunk([], pcm.numpy(), pcm.numel() // self.config.audio_frame_freq)

    def _ensure_stepping(self) -> None:
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.create_task(self._step_forever())

    async def _step_forever(self) -> None:
        while self.outputs:
            decoded = self.engine.step()
            for turn_id, pcm in decoded.items():
                if turn_id in self.outputs:
                    self.outputs[turn_id].put_nowait(self._audio_chunk(pcm))
            if decoded:
                await asyncio.sleep(0)  # let the feeders and replies run between batches
            else:
                await self._wake_stepper.wait()
                self._wake_stepper.clear()
                # The speech stack steps its turns together: give their frames a moment to land, and decode
                # them in one batch rather than one turn at a time (3 ms against 160 ms of audio per chunk).
                await asyncio.sleep(0.003)
