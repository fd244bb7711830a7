"""Per-turn sampling: greedy, or temperature + top-k with the turn's own seeded generator.

Each turn draws its noise from its own generator, so a seeded turn samples the same codes whatever else
shares the batch.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field


class SamplingParams(BaseModel):
    """temperature 0 means greedy (the reference's default)."""

    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_k: int = Field(50, ge=1)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingState:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)


def sample_tokens(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """logits [B, V] float -> token ids [B]."""
    tokens = logits.argmax(dim=-1)
    for row, state in enumerate(states):
        if state.generator is None:
            continue
        scores = logits[row] / state.params.temperature
        kth = torch.topk(scores, min(state.params.top_k, scores.shape[-1])).values[-1]
        probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
        # Exponential-race sampling: argmax(p / q), q ~ Exp(1), draws from p without a host sync.
        noise = torch.empty_like(probs).exponential_(1, generator=state.generator)
        tokens[row] = torch.argmax(probs / noise)
    return tokens
