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
    """A user item joined the conversation: the caller's buffered audio, or a message the client created."""

    item_id: str
    previous_item_id: str | None
    text: str | None  # typed text, if any
    from_buffer: bool  # the input audio buffer's (turn detection or a commit), else conversation.item.create


@dataclass(frozen=True)
class TextItemAdded(CallEvent):
    """A system or assistant message the client created joined the conversation (and the session's history)."""

    item_id: str
    previous_item_id: str | None  # the message it follows in the history
    role: Literal["system", "assistant"]
    text: str


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
    previous_item_id: str | None  # the item it follows in the conversation
    metadata: dict[str, str] | None  # the client's, from its response.create


@dataclass(frozen=True)
class Usage:
    """What a reply took: its prompt's positions (those the prefix cache served among them) and what it made."""

    input_tokens: int = 0
    cached_tokens: int = 0
    text_tokens: int = 0
    audio_frames: int = 0


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
    metadata: dict[str, str] | None = None
    usage: Usage = Usage()


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
class TranscriptionDelta(CallEvent):
    """More of what the caller said in a user item (the session asked for input transcription)."""

    item_id: str
    delta: str


@dataclass(frozen=True)
class TranscriptionCompleted(CallEvent):
    item_id: str
    transcript: str
    audio_s: float  # the audio it transcribed


@dataclass(frozen=True)
class TranscriptionFailed(CallEvent):
    item_id: str
    code: str
    message: str


@dataclass(frozen=True)
class ItemInfo:
    """One item of the call's conversation, as the client may ask for it (conversation.item.retrieve)."""

    item_id: str
    role: str  # "user", "assistant" or "system"
    text: str | None  # a user's typed text, the words of a reply the caller heard, or a client's message
    audio: bool  # it has audio (the caller's, or a reply's)
    complete: bool  # False for a reply still in progress or one cut short


@dataclass(frozen=True)
class CallError(CallEvent):
    """Something the client should know about; the call goes on."""

    code: str
    message: str
    event_id: str | None = None
