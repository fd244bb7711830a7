"""Serve deployment of the Reasoner: streams (token id, hidden state) pairs as the thinker produces them.

Every pair is yielded on its own (no response batching: a 1:2 text/audio interleave at 80 ms frames cannot
wait 50 ms for a batch); hidden states leave as numpy arrays, which Ray ships as plain objects.
"""

from __future__ import annotations

from ray import serve
from ray.actor import ActorHandle

from cluster.config import AppConfig
from deployments.streams import CallerWatch
from model.processing.processor import Conversation
from model.reasoner.settings import build_reasoner


@serve.deployment(name="Reasoner")
class ReasonerDeployment:
    def __init__(self, config: AppConfig):
        model = config.checkpoint
        self.reasoner = build_reasoner(config.reasoner, config.reasoner_path(), model.dtype, model.device)
        self.callers = CallerWatch()

    async def stream(self, conversation: Conversation, max_tokens: int, caller: ActorHandle | None = None):
        """Stopped if `caller` (the SpeechStack replica) dies."""
        with self.callers.guard(caller):
            async for token, hidden in self.reasoner.stream(conversation, max_tokens):
                yield token, hidden.numpy()

    def stats(self) -> dict:
        return {"unfinished_requests": self.reasoner.num_unfinished_requests()}

    async def check_health(self) -> None:
        """Serve's health check: the engine (vLLM's processes) is alive; Serve restarts the replica when not."""
        await self.reasoner.check_health()

    async def probe(self) -> int | None:
        """The Ingress's readiness probe: healthy, and the conversations this replica serves at once."""
        await self.check_health()
        return self.reasoner.max_streams
