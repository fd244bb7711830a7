"""What a call tells its protocol: frozen values that carry ids, never the reply itself. The protocol turns them
into its wire messages and reports back through `CallSession` methods (`audio_sent`, `playback_stopped`,
`mark_acked`), so no protocol reads or changes a reply's state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Outcome = Literal["completed", "cancelled", "failed"]  # how a reply's generation ended (OpenAI's response status)


@dataclass(frozen=True)
class CallEvent:
    pass


@dataclass(frozen=True)
class SpeechStartedEvent(CallEvent):
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStoppedEvent(CallEvent):
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class InputCommitted(CallEvent):
    item_id: str
    previous_item_id: str | None
    text: str | None  # a typed user message; None for caller audio


@dataclass(frozen=True)
class InputCleared(CallEvent):
    pass


@dataclass(frozen=True)
class ReplyCallEvent(CallEvent):
    """Of one reply (the pipeline's own `ReplyEvent`s are what a turn yields; these are what the call says)."""

    reply_id: str
    item_id: str  # the assistant item


@dataclass(frozen=True)
class ReplyStarted(ReplyCallEvent):
    pass


@dataclass(frozen=True, eq=False)
class ReplyAudio(ReplyCallEvent):
    audio: np.ndarray  # float32 at CODEC_RATE


@dataclass(frozen=True)
class ReplyText(ReplyCallEvent):
    delta: str


@dataclass(frozen=True)
class ReplyFinished(ReplyCallEvent):
    """Generation is over: no more audio or text of this reply follows."""

    outcome: Outcome
    reason: str | None  # why it was cancelled (turn_detected, client_cancelled, ...) or failed
    transcript: str


@dataclass(frozen=True)
class PlaybackStopped(ReplyCallEvent):
    """The caller barged in: what is still queued at the far end is to be dropped (telephony `clear`), and the
    protocol calls `CallSession.playback_stopped` once it is."""


@dataclass(frozen=True)
class ItemTruncated(CallEvent):
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class ItemDeleted(CallEvent):
    """An item left the conversation: the client deleted it, or the session's truncation dropped it."""

    item_id: str


@dataclass(frozen=True)
class CallError(CallEvent):
    """Something the client should know about; the call goes on."""

    code: str
    message: str
    event_id: str | None = None
