"""Serve deployment of the Reasoner: streams (token id, hidden state) pairs as the thinker produces them.

Every pair is yielded on its own (no response batching: a 1:2 text/audio interleave at 80 ms frames cannot
wait 50 ms for a batch); hidden states leave as numpy arrays, which Ray ships as plain objects. The turn's prompt
arrives by reference (the Ingress put it in the object store once); the history's caller audio this replica does
not hold yet is read from Redis. A session's turns are routed to the replica that holds its prefix
(`deployments/routing.py`); its `PromptStats` go up the stream first. A call's input transcription is a request
of its own (`transcribe`), beside the reply's.
"""

from __future__ import annotations

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.serve.config import RequestRouterConfig

from cluster.pipeline.turn import ReasonerCall, reasoner_pairs, surfaced, transcript_deltas
from cluster.settings import AppConfig
from cluster.state.store import StateStore, redis_client
from deployments.streams import CallerWatch, answered_here
from model.engines.realtime import Headroom
from model.reasoner import build_reasoner
from model.reasoner.base import PromptStats, ReasonerStats


@serve.deployment(
    name="Reasoner",
    request_router_config=RequestRouterConfig(request_router_class="deployments.routing.SessionAffinityRouter"),
)
class ReasonerDeployment:
    async def __init__(self, config: AppConfig):
        model = config.checkpoint
        self.reasoner = build_reasoner(config.reasoner, config.reasoner_path(), model.dtype, model.device)
        self.state = StateStore(redis_client(config.state), config.state)
        self.callers = CallerWatch()
        await self.reasoner.calibrate()  # on the replica's loop, where vLLM's engine binds, before it is ready

    async def stream(self, call: ReasonerCall, caller: ActorHandle | None = None):
        """The prompt's PromptStats, then its pairs; stopped if `caller` (the SpeechStack replica) dies."""
        prompt = await call.prompt if isinstance(call.prompt, ray.ObjectRef) else call.prompt
        found: list[PromptStats] = []
        with self.callers.guard(caller):
            async for item in surfaced(reasoner_pairs(self.reasoner, prompt, self.state, found.append), found):
                yield item if isinstance(item, PromptStats) else (item[0], item[1].numpy())

    async def transcribe(self, audio: bytes, max_tokens: int, caller: ActorHandle | None = None):
        """Text deltas of what the caller said in `audio` (16 kHz PCM16); stopped if `caller` (the Ingress) dies."""
        with self.callers.guard(caller):
            async for delta in transcript_deltas(self.reasoner, audio, max_tokens):
                yield delta

    def stats(self) -> ReasonerStats:
        return self.reasoner.stats()

    async def check_health(self) -> None:
        """Serve's health check: the engine (vLLM's processes) is alive; Serve restarts the replica when not."""
        await self.reasoner.check_health()

    async def probe(self) -> Headroom:
        """The Ingress's readiness probe: healthy, and the conversations this replica serves at once."""
        await self.check_health()
        return answered_here(self.reasoner.headroom())
