"""A turn's limits, and what a session's history keeps."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cluster.state.history import Truncation
from model.settings import DEFAULT_MAX_FRAMES, DEFAULT_MAX_TOKENS


class TurnSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_frames: int = Field(DEFAULT_MAX_FRAMES, ge=1, description="reply frame limit (12.5 frames per second)")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, description="Reasoner token limit per reply")
    transcript_tokens: int = Field(128, ge=1, description="Reasoner token limit per input transcription")

    def reply_tokens(self) -> int:
        """The Reasoner tokens a reply may take: `max_tokens`, capped by what `max_frames` frames can speak."""
        from model.chroma.turn import reasoner_tokens_for

        return min(self.max_tokens, reasoner_tokens_for(self.max_frames))


class HistorySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    truncation: Truncation = "auto"  # new sessions' policy, unless they name one
    auto_retention_ratio: float = Field(
        0.8, gt=0.0, le=1.0, description='what "auto" keeps of the room after the system prompt when it truncates: '
        "less than all of it, so the next turns fit without truncating again (and hit the prefix cache)",
    )
