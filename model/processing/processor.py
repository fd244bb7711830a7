"""Text + audio processor for the Reasoner (the Qwen2.5-Omni thinker) and the voice prompt.

transformers' Qwen2_5OmniProcessor cannot be built without torchvision (its video processor), so this
module reproduces its text and audio behaviour: the Qwen2.5-Omni chat template, Whisper log-mel
features, and one <|AUDIO|> id per audio-encoder output frame. The tokenizer files of tiny test
checkpoints are written by `model.testing.processor_files`.

A prompt is composed message by message: every message of the chat template starts with <|im_start|>, a special
token the tokenizer splits on, so tokenising the messages one by one gives the ids of the whole prompt. Each
message's ids are kept (an LRU), and each audio's features are computed for that audio alone: a turn late in a
long call tokenises and featurises only what is new.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer, WhisperFeatureExtractor

from model.errors import InvalidInput
from model.processing.audio import CODEC_RATE, REASONER_RATE, resample


# key in special_token_ids -> token text, in official id order.
SPECIAL_TOKENS: dict[str, str] = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio": "<|AUDIO|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
    "box_end": "<|box_end|>",
    "quad_start": "<|quad_start|>",
    "quad_end": "<|quad_end|>",
    "vision_bos": "<|vision_bos|>",
    "vision_eos": "<|vision_eos|>",
    "vision_pad": "<|vision_pad|>",
    "image": "<|IMAGE|>",
    "video": "<|VIDEO|>",
    "text_start": "<|text_start|>",
    "text_end": "<|text_end|>",
}


def _mono_float(audio: np.ndarray, what: str) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise InvalidInput(f"{what} must be mono (1-D), got shape {audio.shape}")
    if audio.size == 0:
        raise InvalidInput(f"{what} is empty")
    # Integer PCM would pass through unscaled and reach the model as loud garbage.
    if not np.issubdtype(audio.dtype, np.floating):
        raise InvalidInput(f"{what} must be float samples in [-1, 1], got {audio.dtype}")
    return audio.astype(np.float32, copy=False)


@dataclass
class Message:
    """One message of the conversation: user messages carry audio and/or text, assistant messages text (empty for
    a reply that said nothing: the thinker ended it at once, and the prompt shows that as it happened), system
    messages text (a client's note for the replies that follow, after the session's own system prompt).

    `audio_id` names the audio's content (stored caller audio: a digest of its PCM16 samples): an engine may keep
    what it computed from it under that id. A user message may then leave `audio` out and give `audio_samples`
    (its length at REASONER_RATE) instead: the audio is *held*, by id, by the engine that will read it."""

    role: Literal["user", "assistant", "system"]
    text: str | None = None
    audio: np.ndarray | None = None
    sample_rate: int | None = None
    audio_id: str | None = None
    audio_samples: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant", "system"):
            raise InvalidInput(f"turn role must be 'user', 'assistant' or 'system', got {self.role!r}")
        if self.role == "system" and not self.text:
            raise InvalidInput("system turn has no text")
        if self.audio is None and self.audio_samples is not None:
            if self.role != "user" or not self.audio_id or self.audio_samples < 1:
                raise InvalidInput("audio held by id needs a user turn, its audio_id and a positive audio_samples")
            return
        if not self.text and self.audio is None and self.role == "user":
            raise InvalidInput("user turn has neither text nor audio")
        if self.audio is None:
            return
        if self.role != "user":
            raise InvalidInput(f"{self.role} turns carry text only; audio is accepted in user turns")
        self.audio = _mono_float(self.audio, "turn audio")
        if self.sample_rate is None or self.sample_rate <= 0:
            raise InvalidInput(f"turn audio needs a positive sample_rate, got {self.sample_rate}")

    @property
    def has_audio(self) -> bool:
        return self.audio is not None or self.audio_samples is not None


@dataclass
class Conversation:
    """What the reply answers: usually ending with the caller's message, but it may end with a reply or hold no
    message at all (the reply then answers the conversation as it stands: a greeting, say)."""

    system_prompt: str
    messages: list[Message] = field(default_factory=list)


@dataclass
class ReasonerInputs:
    """Thinker prefill inputs, laid out as Qwen2_5OmniThinkerForConditionalGeneration expects."""

    input_ids: torch.Tensor  # [1, L] long
    attention_mask: torch.Tensor  # [1, L] long
    input_features: torch.Tensor | None = None  # [num_audios, 128, T] float32, one row per audio in order
    feature_attention_mask: torch.Tensor | None = None  # [num_audios, T] long


@dataclass
class PromptLayout:
    """A conversation's prompt before expansion: its ids with one <|AUDIO|> per audio, and per audio (in order)
    the encoder positions it expands to, its 16 kHz wave (None: held by id) and its id."""

    ids: list[int]
    audio_positions: list[int] = field(default_factory=list)
    waves: list[np.ndarray | None] = field(default_factory=list)
    audio_ids: list[str | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Positions of the expanded prompt (what the Reasoner's context must hold)."""
        return len(self.ids) + sum(self.audio_positions) - len(self.audio_positions)

    def expanded_ids(self, audio_token: int) -> list[int]:
        expanded: list[int] = []
        pending = iter(self.audio_positions)
        for token_id in self.ids:
            expanded.extend([token_id] * next(pending) if token_id == audio_token else [token_id])
        return expanded


@dataclass
class VoicePromptInputs:
    text_ids: torch.Tensor  # [1, n] long, transcript without special tokens
    input_values: torch.Tensor  # [1, 1, S] float32 at 24 kHz
    num_samples: int


@dataclass(frozen=True)
class SpecialIds:
    audio: int
    audio_bos: int
    audio_eos: int
    text_start: int
    text_end: int
    im_end: int


def audio_token_count(feature_len: int) -> int:
    """Qwen2.5-Omni audio encoder output length for `feature_len` mel frames
    (Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths)."""
    after_cnn = (feature_len - 1) // 2 + 1
    return (after_cnn - 2) // 2 + 1


def whisper_features(feature_extractor: WhisperFeatureExtractor, wave: np.ndarray) -> np.ndarray:
    """Log-mel features [128, frames] of one 16 kHz wave, its valid frames only.

    Qwen2.5-Omni pads every audio to chunk_length (300 s). We pad to the audio plus n_fft zeros instead: every frame
    that touches real samples then sees the same zeros after the audio and the same maximum for Whisper's
    dynamic-range clamp, so the valid frames equal the 300 s version at a fraction of the cost. One audio at a time:
    an audio's features never depend on what else is in the conversation, so they are computed once."""
    fe = feature_extractor
    padded_len = -(-(len(wave) + fe.n_fft) // fe.hop_length) * fe.hop_length
    out = fe(
        [np.asarray(wave, dtype=np.float32)], sampling_rate=REASONER_RATE, padding="max_length",
        max_length=padded_len, truncation=False, return_attention_mask=True, return_tensors="np",
    )
    frames = int(out["attention_mask"][0].sum())
    return out["input_features"][0, :, :frames].astype(np.float32)


class ChromaProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor,
        special_ids: SpecialIds,
    ) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.special_ids = special_ids
        expected = {
            SPECIAL_TOKENS["audio"]: special_ids.audio,
            SPECIAL_TOKENS["audio_bos"]: special_ids.audio_bos,
            SPECIAL_TOKENS["audio_eos"]: special_ids.audio_eos,
            SPECIAL_TOKENS["im_end"]: special_ids.im_end,
        }
        for text, config_id in expected.items():
            token_id = tokenizer.convert_tokens_to_ids(text)
            if token_id != config_id:
                raise ValueError(f"tokenizer maps {text} to {token_id} but config.json says {config_id}")
        if feature_extractor.sampling_rate != REASONER_RATE:
            raise ValueError(
                f"feature extractor runs at {feature_extractor.sampling_rate} Hz, expected {REASONER_RATE}"
            )
        # Texts that would be read as control tokens if they appeared inside user or system text.
        self._added_token_texts = tuple(tokenizer.get_added_vocab())
        self._im_start = tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["im_start"]))
        self._empty_system = self._render([{"role": "system", "content": ""}])
        self.generation_ids = self._tokens(self._render([{"role": "system", "content": ""}], True)[len(self._empty_system):])
        # Tokenising text is the costly part of building a long prompt: each message's ids are kept.
        self._message_ids = functools.lru_cache(maxsize=4096)(self._message_ids_uncached)
        self._system_ids = functools.lru_cache(maxsize=64)(self._system_ids_uncached)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChromaProcessor:
        path = Path(path)
        for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing; the processor needs it")
        # Without vocabulary files Qwen2Tokenizer quietly builds an empty tokenizer instead of failing.
        has_vocab = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        if not ((path / "tokenizer.json").is_file() or has_vocab):
            raise FileNotFoundError(f"{path / 'tokenizer.json'} (or vocab.json + merges.txt) is missing")
        config = json.loads((path / "config.json").read_text())
        try:
            thinker = config["thinker_config"]
            special_ids = SpecialIds(
                audio=thinker["audio_token_index"],
                audio_bos=thinker["audio_start_token_id"],
                audio_eos=thinker["audio_end_token_id"],
                text_start=config["text_start_token_id"],
                text_end=config["text_end_token_id"],
                im_end=config["im_end_token_id"],
            )
        except KeyError as exc:
            raise ValueError(f"{path / 'config.json'} lacks {exc.args[0]!r}") from exc
        # The class is named directly: AutoTokenizer would first read config.json and warn about `chroma`.
        tokenizer = Qwen2Tokenizer.from_pretrained(path, local_files_only=True)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, feature_extractor, special_ids)

    def _check_text(self, text: str, what: str) -> None:
        for token in self._added_token_texts:
            if token in text:
                raise InvalidInput(f"{what} contains the reserved token {token}")

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _message_ids_uncached(self, role: str, text: str | None, audio: bool) -> tuple[int, ...]:
        """One message's ids as the chat template renders it after a system message (one <|AUDIO|> for its audio)."""
        parts: list[dict[str, str]] = [{"type": "audio"}] if audio else []
        if text:
            parts.append({"type": "text", "text": text})
        rendered = self._render([{"role": "system", "content": ""}, {"role": role, "content": parts}])
        if not rendered.startswith(self._empty_system) or not rendered[len(self._empty_system):].startswith(self._im_start):
            raise ValueError("the chat template does not render message by message (each from <|im_start|>)")
        return tuple(self._tokens(rendered[len(self._empty_system):]))

    def system_ids(self, system_prompt: str) -> tuple[int, ...]:
        self._check_text(system_prompt, "system prompt")
        return self._system_ids(system_prompt)

    def _system_ids_uncached(self, system_prompt: str) -> tuple[int, ...]:
        return tuple(self._tokens(self._render([{"role": "system", "content": system_prompt}])))

    def audio_positions(self, num_samples: int) -> int:
        """The encoder positions (<|AUDIO|> ids) of an audio of `num_samples` at REASONER_RATE."""
        return audio_token_count(-(-num_samples // self.feature_extractor.hop_length))

    def message_positions(self, message: Message) -> int:
        """The positions `message` takes in a prompt, its audio expanded."""
        ids = self._message_ids(message.role, message.text or None, message.has_audio)
        return len(ids) + (self.audio_positions(_samples_at_reasoner_rate(message)) - 1 if message.has_audio else 0)

    def layout(self, conv: Conversation, max_audio_seconds: float = 300.0) -> PromptLayout:
        """The prompt of `conv`, composed message by message, with each audio's length, wave and id."""
        layout = PromptLayout(list(self.system_ids(conv.system_prompt)))
        for n, turn in enumerate(conv.messages):
            if turn.text:
                self._check_text(turn.text, f"turn {n} text")
            if turn.has_audio:
                wave = None if turn.audio is None else resample(turn.audio, turn.sample_rate, REASONER_RATE)
                samples = turn.audio_samples if wave is None else len(wave)
                if samples / REASONER_RATE > max_audio_seconds:
                    raise InvalidInput(
                        f"turn {n} audio is {samples / REASONER_RATE:.1f} s long; the limit is {max_audio_seconds:.1f} s"
                    )
                positions = self.audio_positions(samples)
                if positions < 1:
                    ms = 1000 * samples / REASONER_RATE
                    raise InvalidInput(f"audio {len(layout.waves)} is too short to encode ({ms:.1f} ms; needs more than 20 ms)")
                layout.audio_positions.append(positions)
                layout.waves.append(wave)
                layout.audio_ids.append(turn.audio_id)
            layout.ids.extend(self._message_ids(turn.role, turn.text or None, turn.has_audio))
        layout.ids.extend(self.generation_ids)
        return layout

    def audio_features(self, wave: np.ndarray) -> np.ndarray:
        """Whisper features [128, frames] of one 16 kHz wave (see `whisper_features`)."""
        return whisper_features(self.feature_extractor, wave)

    def encode_conversation(self, conv: Conversation, max_audio_seconds: float = 300.0) -> ReasonerInputs:
        """The thinker's prefill inputs for `conv`; every audio must be given (none held by id)."""
        layout = self.layout(conv, max_audio_seconds)
        ids = layout.expanded_ids(self.special_ids.audio)
        if not layout.waves:
            return ReasonerInputs(
                input_ids=torch.tensor([ids], dtype=torch.long),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                input_features=None,
                feature_attention_mask=None,
            )
        if any(wave is None for wave in layout.waves):
            raise InvalidInput("this Reasoner needs every audio of the conversation; some are held by id only")
        features = [self.audio_features(wave) for wave in layout.waves]
        frames = max(f.shape[1] for f in features)
        # Padded to the longest; the thinker reads the valid frames through the mask.
        batch = np.zeros((len(features), features[0].shape[0], frames), dtype=np.float32)
        mask = np.zeros((len(features), frames), dtype=np.int64)
        for i, f in enumerate(features):
            batch[i, :, : f.shape[1]] = f
            mask[i, : f.shape[1]] = 1
        return ReasonerInputs(
            input_ids=torch.tensor([ids], dtype=torch.long),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            input_features=torch.from_numpy(batch),
            feature_attention_mask=torch.from_numpy(mask),
        )

    def encode_voice_prompt(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePromptInputs:
        if not transcript.strip():
            raise InvalidInput("voice prompt transcript is empty")
        self._check_text(transcript, "voice prompt transcript")
        audio = _mono_float(audio, "voice prompt audio")
        text_ids = self.tokenizer(transcript, add_special_tokens=False)["input_ids"]
        wave = resample(audio, sample_rate, CODEC_RATE)
        return VoicePromptInputs(
            text_ids=torch.tensor([text_ids], dtype=torch.long),
            input_values=torch.from_numpy(wave).reshape(1, 1, -1),
            num_samples=len(wave),
        )

    def decode_text(self, token_ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            token_ids = token_ids.reshape(-1).tolist()
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _samples_at_reasoner_rate(message: Message) -> int:
    if message.audio is None:
        return int(message.audio_samples)
    if message.sample_rate == REASONER_RATE:
        return message.audio.size
    return len(resample(message.audio, message.sample_rate, REASONER_RATE))
