"""Serve deployment of the HTTP API (cluster/api.py) over the deployment chain.

`RayTurnBackend` is the API's TurnBackend on Serve handles: a turn is one streaming call to the Codec, which
pulls frames from the SpeechStack, which pulls (token, hidden state) pairs from the Reasoner. Closing the
reply (the caller hung up) cancels that call, and Serve cancels down the chain.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api import ApiSettings, AudioChunk, ReplyEvent, TextDelta, build_api
from cluster.local_backend import IncrementalText, build_conversation, closing_events, voice_prompt
from cluster.state import Session, StateSettings, StateStore, TenantDirectory, TenantSettings, Voice, redis_client
from model.processor import ChromaProcessor


class RayTurnBackend:
    def __init__(self, codec: DeploymentHandle, processor: ChromaProcessor, max_tokens: int, max_frames: int):
        self.codec = codec
        self.processor = processor
        self.max_tokens = max_tokens
        self.max_frames = max_frames

    async def ready(self) -> bool:
        return True

    async def encode_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> tuple[list[int], np.ndarray, int]:
        prompt = self.processor.encode_voice_prompt(transcript, audio, sample_rate)  # ValueError for bad input
        voice = await self.codec.encode_voice.remote(prompt.text_ids[0].tolist(), prompt.input_values.reshape(-1).numpy())
        return voice.transcript_ids.tolist(), voice.codes.numpy(), voice.valid_frames

    async def run_turn(
        self, turn_id: str, voice: Voice, session: Session, history_audio: list[bytes | None],
        user_audio_16k: np.ndarray, *, max_tokens: int | None = None, max_frames: int | None = None,
    ) -> AsyncIterator[ReplyEvent]:
        started = time.perf_counter()
        conversation = build_conversation(session, history_audio, user_audio_16k)
        reply = self.codec.options(stream=True).reply.remote(
            turn_id, voice_prompt(voice), conversation, session.sampling,
            max_frames or self.max_frames, max_tokens or self.max_tokens,
        )
        text, frames, first_audio = IncrementalText(self.processor), 0, None
        try:
            async for chunk in reply:
                if delta := text.add(chunk.text_tokens):
                    yield TextDelta(delta)
                if chunk.audio is not None:
                    frames += chunk.frames
                    first_audio = first_audio or time.perf_counter()
                    yield AudioChunk(chunk.audio)
            for event in closing_events(text, frames, started, first_audio):
                yield event
        finally:
            reply.cancel()  # no-op after the last chunk; otherwise the caller left and the chain stops


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(self, codec: DeploymentHandle, checkpoint: str, redis_url: str | None = None,
                 api_keys_path: str | None = None, max_tokens: int = 256, max_frames: int = 750):
        self.backend = RayTurnBackend(codec, ChromaProcessor.from_pretrained(checkpoint), max_tokens, max_frames)
        state_settings = StateSettings(**({"redis_url": redis_url} if redis_url else {}))
        self.state = StateStore(redis_client(state_settings), state_settings)
        tenant_settings = TenantSettings(**({"api_keys": api_keys_path} if api_keys_path else {}))
        self.tenants = TenantDirectory.from_settings(tenant_settings)

    def __serve_build_asgi_app__(self):
        return build_api(self.state, self.tenants, self.backend, ApiSettings())
