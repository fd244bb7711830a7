"""The Reasoner: the Qwen2.5-Omni thinker as a streaming service of (text token, hidden state) pairs.

`Reasoner` is the interface both engines implement:

    async for token, hidden in reasoner.stream(conversation, max_tokens):
        ...  # token: int id; hidden: [hidden_size] float32 CPU tensor, the thinker's last-layer state after the
             # final norm at the position that produced `token` (what the speech Backbone consumes)

The stream is greedy (the reference thinker always is), yields one pair per generated token in order, stops after
im_end (which is yielded) or after `max_tokens` pairs, and stops early at the end of the thinker's context.
Closing the iterator (`aclose()`) or cancelling the task that iterates it releases the request at once.
`on_prompt`, if given, is called once with the prompt's `PromptStats` (its length, and how much of it the engine's
prefix cache served) before the first pair.

A conversation's user audio may be *held* (`Message.audio_samples` and `audio_id`, no samples): an engine that
keeps what it computed from an audio by id (`holds_audio`) reads it from there. One that does not hold it raises
`AudioNotHeld` before streaming anything, and the caller sends the audio itself.

- `HFReasoner` (model/reasoner/hf.py): transformers; the reference and the fallback where vLLM is absent.
- `VLLMReasoner` (model/reasoner/vllm/engine.py): vLLM's async engine, continuous batching and prefix caching.

Both take a `model.processing.processor.Conversation` and encode it with `ChromaProcessor`, so they see the same
ids and the same Whisper features. The Reasoner's directory holds the checkpoint's thinker alone (`chroma-serve
checkpoint split`); a full Chroma checkpoint also works for the transformers engine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from model.chroma.turn import ReasonerPair
from model.engines.realtime import Headroom
from model.errors import InternalError, InvalidInput
from model.processing.processor import SPECIAL_TOKENS, ChromaProcessor, Conversation, ReasonerInputs, SpecialIds


class ReasonerError(InvalidInput):
    """A conversation the Reasoner cannot take (too long for its context, empty, malformed)."""


class ReasonerEngineError(InternalError):
    """The engine or its hidden-state channel failed."""


class AudioNotHeld(Exception):
    """Audio the conversation gives by id only, which this engine does not hold (any more): send it (`ids`)."""

    def __init__(self, ids: list[str]):
        super().__init__(f"the Reasoner does not hold audio {', '.join(ids)}")
        self.ids = ids


@dataclass
class PromptStats:
    """One request's prompt: its positions, and those the engine's prefix cache served (not computed again)."""

    prompt_tokens: int
    cached_tokens: int = 0

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class ReasonerStats:
    """An engine's streams and real-time capacity (`Reasoner.stats`)."""

    unfinished_requests: int
    realtime_streams: int | None  # None: it sets no bound
    step_ms_by_batch: dict[int, float]  # the decode steps' curve (model.engines.realtime)
    calibration_s: float | None  # None: it measured nothing


@runtime_checkable
class Reasoner(Protocol):
    processor: ChromaProcessor
    context: int  # positions: the prompt and its reply
    max_audios: int | None  # caller utterances one conversation may hold; None: no bound

    def stream(
        self, conversation: Conversation, max_tokens: int, on_prompt: Callable[[PromptStats], None] | None = None
    ) -> AsyncIterator[ReasonerPair]:
        """(token id, hidden state [hidden] float32 CPU) per generated token; see the module docstring."""
        ...

    def holds_audio(self, audio_id: str) -> bool:
        """Whether a conversation may give this audio by id alone."""
        ...

    def warm(self, conversation: Conversation) -> None:
        """Start computing `conversation`'s prompt (its audio held by id) into a prefix cache, in the background, for
        a later request that starts with it; best effort, and a no-op for an engine without one."""
        ...

    def num_unfinished_requests(self) -> int:
        """Streams the engine still holds (a cancelled one must leave at once)."""
        ...

    def headroom(self) -> Headroom:
        """Conversations it serves at once in real time (`model.engines.realtime`), from the event loop."""
        ...

    async def calibrate(self) -> None:
        """Measure what `headroom` reports before serving (a no-op for an engine that sets no bound)."""
        ...

    def stats(self) -> ReasonerStats:
        """Read only: no probe starts."""
        ...

    async def check_health(self) -> None:
        """Raise ReasonerEngineError when the engine cannot serve any more (its processes died)."""
        ...

    async def close(self) -> None:
        """Release the engine."""
        ...


def check_reasoner_dir(path: str | Path) -> Path:
    """A Reasoner directory (from `chroma-serve checkpoint split`) or a full Chroma checkpoint; clear errors."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Reasoner directory {path} does not exist (make one with `chroma-serve checkpoint split`)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} is missing; {path} is not a Reasoner directory")
    return path


def load_reasoner_processor(path: str | Path) -> ChromaProcessor:
    """`ChromaProcessor` for a Reasoner directory or a full Chroma checkpoint.

    A Reasoner directory's config.json is the thinker's own config, which names the audio ids but not Chroma's
    text_start/text_end (voice-prompt ids the Reasoner never uses); those are read from the tokenizer."""
    path = check_reasoner_dir(path)
    config = json.loads((path / "config.json").read_text())
    if "thinker_config" in config:
        return ChromaProcessor.from_pretrained(path)
    from transformers import Qwen2Tokenizer, WhisperFeatureExtractor

    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; the processor needs it")
    tokenizer = Qwen2Tokenizer.from_pretrained(path, local_files_only=True)
    try:
        special_ids = SpecialIds(
            audio=config["audio_token_index"],
            audio_bos=config["audio_start_token_id"],
            audio_eos=config["audio_end_token_id"],
            text_start=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["text_start"]),
            text_end=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["text_end"]),
            im_end=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["im_end"]),
        )
    except KeyError as exc:
        raise ValueError(f"{path / 'config.json'} lacks {exc.args[0]!r}") from exc
    feature_extractor = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
    return ChromaProcessor(tokenizer, feature_extractor, special_ids)


def check_conversation(conversation: Conversation) -> None:
    if not isinstance(conversation, Conversation):
        raise ReasonerError(f"expected a model.processing.processor.Conversation, got {type(conversation).__name__}")


def check_fits(prompt_len: int, context: int) -> None:
    """The prompt must leave room for at least one generated token in `context` positions."""
    if prompt_len >= context:
        raise ReasonerError(
            f"conversation takes {prompt_len} positions (audio and text), more than the Reasoner's context of "
            f"{context} minus one for the reply: shorten the audio or drop earlier turns"
        )


def held_audio_ids(conversation: Conversation) -> list[str]:
    """The ids of the audio `conversation` gives by id alone."""
    return [m.audio_id for m in conversation.messages if m.audio is None and m.audio_samples is not None]


def encode_for_reasoner(processor: ChromaProcessor, conversation: Conversation, context: int) -> ReasonerInputs:
    """Encode a conversation whose audio is all given, and check that it fits `context`."""
    check_conversation(conversation)
    if held := held_audio_ids(conversation):
        raise AudioNotHeld(held)
    inputs = processor.encode_conversation(conversation)
    check_fits(inputs.input_ids.shape[1], context)
    return inputs


def token_budget(max_tokens: int, prompt_len: int, context: int) -> int:
    if max_tokens < 1:
        raise ReasonerError(f"max_tokens must be >= 1, got {max_tokens}")
    return min(max_tokens, context - prompt_len)
