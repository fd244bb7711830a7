"""Serve deployment of the Reasoner: streams (token id, hidden state) pairs as the thinker produces them.

Every pair is yielded on its own (no response batching: a 1:2 text/audio interleave at 80 ms frames cannot
wait 50 ms for a batch); hidden states leave as numpy arrays, which Ray ships as plain objects.
"""

from __future__ import annotations

from ray import serve

from model.processor import Conversation


@serve.deployment(name="Reasoner")
class ReasonerDeployment:
    def __init__(self, thinker_dir: str, engine: str = "vllm", engine_kwargs: dict | None = None):
        if engine == "vllm":
            from model.vllm_reasoner import VLLMReasoner

            self.reasoner = VLLMReasoner(thinker_dir, **(engine_kwargs or {}))
        elif engine == "hf":
            from model.reasoner import HFReasoner

            self.reasoner = HFReasoner.from_pretrained(thinker_dir)
        else:
            raise ValueError(f"unknown reasoner engine {engine!r}; use 'vllm' or 'hf'")

    async def stream(self, conversation: Conversation, max_tokens: int):
        async for token, hidden in self.reasoner.stream(conversation, max_tokens):
            yield token, hidden.numpy()

    def stats(self) -> dict:
        return {"unfinished_requests": self.reasoner.num_unfinished_requests()}
