"""One assistant reply of a call and the caller's turn it answers, if any (a reply may answer the conversation as it
stands: a greeting). A reply's life is one `ReplyState`, moved only by `Reply.move`, which refuses a move the table
below does not allow."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import numpy as np

from cluster.calls.cursor import PlaybackCursor
from cluster.calls.events import Outcome
from cluster.pipeline.history import TurnPlan, UserTurn
from model.errors import InternalError
from model.reasoner.base import PromptStats

FRAME_MS = 80  # one Mimi frame


class ReplyState(enum.Enum):
    SPECULATIVE = "speculative"  # generating inside the caller's silence window; its events are held back
    SPEAKING = "speaking"  # generating; its audio goes out
    PLAYING = "playing"  # generated in full; the far end is still playing it
    INTERRUPTED = "interrupted"  # stopped early (barge-in, cancel, truncate, hang-up): no more of it is sent
    FAILED = "failed"  # generation failed: the caller's turn waits for the next reply
    DROPPED = "dropped"  # speculative, and the caller spoke on: it leaves no trace
    COMMITTED = "committed"  # its turn is in the session's history; only a truncate still revises it


S = ReplyState
TRANSITIONS: dict[ReplyState, frozenset[ReplyState]] = {
    S.SPECULATIVE: frozenset({S.SPEAKING, S.DROPPED}),
    S.SPEAKING: frozenset({S.PLAYING, S.INTERRUPTED, S.FAILED}),
    S.PLAYING: frozenset({S.INTERRUPTED, S.COMMITTED}),
    S.INTERRUPTED: frozenset({S.COMMITTED}),
    S.FAILED: frozenset(),
    S.DROPPED: frozenset(),
    S.COMMITTED: frozenset(),
}
del S


class IllegalTransition(InternalError):
    """A bug of the call engine: it tried a move its own table forbids."""


@dataclass
class UserInput:
    """The caller's turn waiting for (or answered by) a reply."""

    item_id: str
    audio: np.ndarray | None = None  # 16 kHz float32
    text: str | None = None

    def extend(self, later: UserInput) -> None:
        """Two commits before a reply are one turn."""
        if later.audio is not None:
            self.audio = later.audio if self.audio is None else np.concatenate([self.audio, later.audio])
        if later.text:
            self.text = f"{self.text} {later.text}" if self.text else later.text

    def turn(self) -> UserTurn:
        return UserTurn.of(self.item_id, self.audio, self.text)


@dataclass
class Reply:
    id: str
    item_id: str
    user: UserInput | None  # None: a reply to the conversation as it stands (response.create with no new input)
    cursor: PlaybackCursor
    committed_at: float | None  # the caller's turn was committed (voice-to-voice latency counts from here)
    vad_window_s: float  # how long the turn detector waited in silence before that
    state: ReplyState = ReplyState.SPEAKING
    outcome: Outcome | None = None  # how generation ended, once it has
    reason: str | None = None  # why it was cancelled or failed
    task: asyncio.Task | None = None  # its generation
    held: list = field(default_factory=list)  # while SPECULATIVE: its events and its end, replayed on take-over
    tokens: list[tuple[int, list[int]]] = field(default_factory=list)  # (frame it entered with, tokens)
    transcript: str = ""
    frames: int = 0  # generated
    metadata: dict[str, str] | None = None  # the client's, from its response.create
    prompt: PromptStats | None = None  # its prompt, as the Reasoner counted it
    plan: TurnPlan | None = None  # its prompt, as the history policy planned it
    committed_version: int | None = None  # the session version its turn was committed as
    committed_text: str | None = None
    truncated_ms: int | None = None  # the first truncate's audio_end_ms: a later one cannot cut below it
    audio_started: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # its first audio was generated
    far_end_stopped: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # after a barge-in
    # A barge-in and the client's truncate can settle one reply at once: one commit, then revisions, in order.
    settling: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def move(self, to: ReplyState) -> None:
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"reply {self.id}: {self.state.value} -> {to.value}")
        self.state = to

    def user_turn(self) -> UserTurn | None:
        return None if self.user is None else self.user.turn()

    @property
    def generating(self) -> bool:
        return self.state in (ReplyState.SPECULATIVE, ReplyState.SPEAKING)

    @property
    def audible(self) -> bool:
        """Its audio may still go out to the caller."""
        return self.state in (ReplyState.SPEAKING, ReplyState.PLAYING)

    @property
    def audio_ms(self) -> int:
        return self.frames * FRAME_MS
