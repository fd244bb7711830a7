"""Serve deployment of the speech stack: SpeechEngine (Backbone + Decoder, continuous batching) per replica.

A turn's thinker input is the Reasoner's stream, consumed as it arrives; closing a turn (finished, cancelled
by the caller) closes that stream, which cancels the Reasoner's request.
"""

from __future__ import annotations

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from model.checkpoint import load_component
from model.generate import VoicePrompt, thinker_tokens_for
from model.processor import Conversation
from model.sampling import SamplingParams
from model.speech_engine import SpeechEngine, SpeechEngineSettings


@serve.deployment(name="SpeechStack")
class SpeechStackDeployment:
    def __init__(self, checkpoint: str, reasoner: DeploymentHandle, engine: dict | None = None,
                 dtype: str = "float32", device: str = "cpu"):
        self.engine = SpeechEngine(load_component(checkpoint, "speech", dtype, device), SpeechEngineSettings(**(engine or {})))
        self.reasoner = reasoner

    async def generate(self, turn_id: str, voice: VoicePrompt, conversation: Conversation,
                       sampling: SamplingParams | None, max_frames: int, max_tokens: int, frames_per_message: int = 1):
        """Yields lists of `frames_per_message` frames (the last may be shorter). The codec decodes in chunks of
        its own size anyway, so sending frames in those groups halves the messages at no cost in latency."""
        max_tokens = min(max_tokens, thinker_tokens_for(max_frames))
        pairs = self.reasoner.options(stream=True).stream.remote(conversation, max_tokens)
        frames = await self.engine.submit(turn_id, voice, _torch_pairs(pairs), sampling, max_frames)
        group = []
        async for frame in frames:
            group.append(frame)
            if sum(f.codes is not None for f in group) >= frames_per_message:
                yield group
                group = []
        if group:
            yield group

    def stats(self) -> dict:
        return self.engine.stats()


async def _torch_pairs(pairs):
    try:
        async for token, hidden in pairs:
            yield token, torch.from_numpy(hidden.copy())  # Ray hands over read-only arrays
    finally:
        pairs.cancel()  # no-op once the Reasoner's stream is done; otherwise stops its request
