"""Serve deployment of the HTTP API (cluster/api) over the deployment chain.

`RayTurnBackend` is the API's TurnBackend on Serve handles: a turn is one streaming call to the Codec, which
pulls frames from the SpeechStack, which pulls (token, hidden state) pairs from the Reasoner. Closing the
reply (the caller hung up) cancels that call, and each stage cancels its own upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api.app import build_api
from cluster.config import AppConfig
from cluster.pipeline.turn import ReplyEvent, TurnSettings, build_turn_request, clone_voice, reply_events
from cluster.state.store import Session, StateStore, Voice, redis_client
from cluster.state.tenants import TenantDirectory
from deployments.streams import relay, result
from model.chroma.turn import VoicePrompt
from model.processing.processor import ChromaProcessor, Message, VoicePromptInputs


class RayTurnBackend:
    def __init__(self, codec: DeploymentHandle, processor: ChromaProcessor, turns: TurnSettings):
        self.codec = codec
        self.processor = processor
        self.turns = turns

    async def ready(self) -> bool:
        return True

    async def clone_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePrompt:
        return await clone_voice(self.processor, self._encode_voice, transcript, audio, sample_rate)

    async def _encode_voice(self, inputs: VoicePromptInputs) -> VoicePrompt:
        return await result(self.codec.encode_voice.remote(inputs), "Codec")

    def run_turn(
        self, turn_id: str, voice: Voice, session: Session, history_audio: list[bytes | None], user: Message
    ) -> AsyncIterator[ReplyEvent]:
        request = build_turn_request(turn_id, voice, session, history_audio, user, self.turns)
        return reply_events(self.processor, relay(lambda: self.codec.options(stream=True).reply.remote(request), "Codec"))


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(self, config: AppConfig, codec: DeploymentHandle):
        self.backend = RayTurnBackend(codec, ChromaProcessor.from_pretrained(config.checkpoint.path), config.turns)
        self.state = StateStore(redis_client(config.state), config.state)
        self.tenants = TenantDirectory.from_settings(config.tenants)
        self.config = config

    def __serve_build_asgi_app__(self):
        config = self.config
        return build_api(self.state, self.tenants, self.backend, config.api, config.calls, config.telephony)
