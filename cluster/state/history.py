"""What a session keeps of its conversation: the truncation policy it is set to, and the record of what left.

The policy follows the OpenAI Realtime GA session field `truncation`: when the conversation would not fit the
Reasoner's context with room for the reply, messages are dropped from the oldest ("auto"), down to a fraction of
the room ("retention_ratio": dropping more at once leaves room for the next turns, whose prompts then start with
what the Reasoner has cached), or never ("disabled": the turn is refused, naming the limit). The drop itself is
planned by `cluster.pipeline.history.HistoryPolicy` and committed with the turn (`StateStore.append_turn`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_DROPPED_IDS = 64  # a session keeps the ids of the latest messages that left its history


class TokenLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    post_instructions: int | None = Field(
        None, ge=1, description="at most this many positions after the system prompt (at most the context's room)",
    )


class RetentionRatio(BaseModel):
    """Truncate to `retention_ratio` of the room after the system prompt, so that truncations are rare."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["retention_ratio"] = "retention_ratio"
    retention_ratio: float = Field(gt=0.0, le=1.0)
    token_limits: TokenLimits | None = None


Truncation = Annotated[
    Literal["auto", "disabled"] | RetentionRatio,
    Field(description='"auto" (drop the oldest messages to fit, as the server sees fit), "disabled" (refuse a turn '
          'that does not fit) or {"type": "retention_ratio", "retention_ratio": r}'),
]


class DroppedHistory(BaseModel):
    """What left the session's history (and the Reasoner's context), and why."""

    messages: int = Field(0, description="messages removed by truncation")
    caller_audio: int = Field(0, description="caller utterances whose audio was removed by truncation")
    deleted: int = Field(0, description="messages the client deleted")
    item_ids: list[str] = Field(default_factory=list, description=f"the latest {MAX_DROPPED_IDS} ids that left")

    def record(self, ids: list[str], *, audio: int = 0, deleted: bool = False) -> None:
        if deleted:
            self.deleted += len(ids)
        else:
            self.messages += len(ids)
            self.caller_audio += audio
        self.item_ids = [*self.item_ids, *ids][-MAX_DROPPED_IDS:]


class HistoryDrop(BaseModel):
    """What one turn's commit takes out of the history: whole messages, and the audio of others (their text stays)."""

    messages: list[str] = Field(default_factory=list)
    audio: list[str] = Field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.messages or self.audio)
