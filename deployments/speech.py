"""Serve deployment of the speech stack: a SpeechEngine (Backbone + Decoder, continuous batching) per replica.

A turn's Reasoner input is the Reasoner's stream, consumed as it arrives; closing a turn (finished, cancelled
by the caller) closes that stream, which cancels the Reasoner's request. The Reasoner's PromptStats go on up the
stream, ahead of the frames.
"""

from __future__ import annotations

import asyncio
import contextlib

import torch
from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from cluster.pipeline.turn import SpeechRequest, peel, speech_frames, surfaced
from cluster.settings import AppConfig
from deployments.streams import CallerWatch, answered_here, relay, this_replica
from model.chroma.checkpoint import Checkpoint
from model.engines.realtime import Headroom
from model.engines.speech import SpeechEngine, SpeechStats
from model.reasoner.base import PromptStats


@serve.deployment(name="SpeechStack")
class SpeechStackDeployment:
    def __init__(self, config: AppConfig, reasoner: DeploymentHandle):
        model = config.checkpoint
        self.engine = SpeechEngine.from_checkpoint(Checkpoint(model.path), config.speech, model.dtype, model.device)
        self.reasoner = reasoner
        self.callers = CallerWatch()

    async def generate(self, request: SpeechRequest, group_size: int, caller: ActorHandle | None = None):
        """The turn's frames, in groups of `group_size` (the codec's chunk size); stopped if `caller` (the Codec
        replica) dies."""
        stream = self.reasoner.options(stream=True).stream
        found: list[PromptStats] = []
        pairs = peel(relay(lambda: stream.remote(request.reasoner, this_replica()), "Reasoner"), PromptStats, found)
        with self.callers.guard(caller):
            async for item in surfaced(speech_frames(self.engine, request, _as_tensors(pairs), group_size), found):
                yield item

    def stats(self) -> SpeechStats:
        return self.engine.stats()

    async def check_health(self) -> None:
        """Serve's health check: the engine's state can be read (its lock is not held by a wedged step)."""
        await asyncio.to_thread(self.engine.stats)

    async def probe(self) -> Headroom:
        """The Ingress's readiness probe: healthy, and the turns this replica holds at once in real time."""
        await self.check_health()
        return answered_here(self.engine.headroom())


async def _as_tensors(pairs):
    async with contextlib.aclosing(pairs):  # the engine closing this stops the Reasoner's request at once
        async for token, hidden in pairs:
            yield token, torch.from_numpy(hidden.copy())  # Ray hands over read-only arrays
