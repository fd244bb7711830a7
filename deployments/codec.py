"""Serve deployment of the codec: voice encoding, and the streaming Mimi decode of every live reply per replica.

A reply pulls its frames from the SpeechStack as they are generated; the replica's CodecLoop decodes the ready
chunks of all replies in one batched forward on its own thread. The Reasoner's PromptStats go on up the stream.
"""

from __future__ import annotations

from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from cluster.pipeline.turn import SpeechRequest, peel, surfaced
from cluster.settings import AppConfig
from deployments.streams import CallerWatch, answered_here, relay, this_replica
from model.chroma.checkpoint import Checkpoint
from model.chroma.turn import VoicePrompt
from model.engines.codec import CodecEngine, CodecStats
from model.engines.codec_loop import CodecLoop
from model.engines.realtime import Headroom
from model.processing.processor import VoicePromptInputs
from model.reasoner.base import PromptStats


@serve.deployment(name="Codec")
class CodecDeployment:
    def __init__(self, config: AppConfig, speech: DeploymentHandle):
        model = config.checkpoint
        self.loop = CodecLoop(CodecEngine.from_checkpoint(Checkpoint(model.path), config.codec, model.dtype, model.device))
        self.speech = speech
        self.callers = CallerWatch()

    async def encode_voice(self, inputs: VoicePromptInputs) -> VoicePrompt:
        return await self.loop.encode_voice(inputs.text_ids[0], inputs.input_values, inputs.num_samples)

    async def reply(self, request: SpeechRequest, caller: ActorHandle | None = None):
        """The reply's chunks; stopped if `caller` (the Ingress replica) dies."""
        generate = self.speech.options(stream=True).generate
        groups = relay(lambda: generate.remote(request, self.loop.engine.chunk_frames, this_replica()), "SpeechStack")
        found: list[PromptStats] = []
        with self.callers.guard(caller):
            async for item in surfaced(self.loop.decode(request.turn_id, peel(groups, PromptStats, found)), found):
                yield item

    def stats(self) -> CodecStats:
        return self.loop.stats()

    async def check_health(self) -> None:
        """Serve's health check: the codec's worker thread still runs work."""
        await self.loop.check()

    async def probe(self) -> Headroom:
        """The Ingress's readiness probe: healthy, and the replies this replica decodes at once in real time."""
        await self.check_health()
        return answered_here(self.loop.headroom())
