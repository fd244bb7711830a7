"""Text + audio processor for the Reasoner (the Qwen2.5-Omni thinker) and the voice prompt.

transformers' Qwen2_5OmniProcessor cannot be built without torchvision (its video processor), so this
module reproduces its text and audio behaviour: the Qwen2.5-Omni chat template, Whisper log-mel
features, and one <|AUDIO|> id per audio-encoder output frame. The tokenizer files of tiny test
checkpoints are written by `model.testing.processor_files`.
"""

from __future__ import annotations

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
    """One side's turn in the conversation: user messages carry audio and/or text, assistant messages text."""

    role: Literal["user", "assistant"]
    text: str | None = None
    audio: np.ndarray | None = None
    sample_rate: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise InvalidInput(f"turn role must be 'user' or 'assistant', got {self.role!r}")
        if not self.text and self.audio is None:
            raise InvalidInput(f"{self.role} turn has neither text nor audio")
        if self.audio is None:
            return
        if self.role != "user":
            raise InvalidInput("assistant turns carry text only; audio is accepted in user turns")
        self.audio = _mono_float(self.audio, "turn audio")
        if self.sample_rate is None or self.sample_rate <= 0:
            raise InvalidInput(f"turn audio needs a positive sample_rate, got {self.sample_rate}")


@dataclass
class Conversation:
    system_prompt: str
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidInput("conversation has no turns: it needs at least one user message")
        if self.messages[-1].role != "user":
            raise InvalidInput(f"the last turn must be a user turn, got {self.messages[-1].role!r}")


@dataclass
class ReasonerInputs:
    """Thinker prefill inputs, laid out as Qwen2_5OmniThinkerForConditionalGeneration expects."""

    input_ids: torch.Tensor  # [1, L] long
    attention_mask: torch.Tensor  # [1, L] long
    input_features: torch.Tensor | None = None  # [num_audios, 128, T] float32, one row per audio in order
    feature_attention_mask: torch.Tensor | None = None  # [num_audios, T] long


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

    def _features(self, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Log-mel features [n, 128, T] and frame mask [n, T] for 16 kHz waves.

        Qwen2.5-Omni pads every audio to chunk_length (300 s). We pad to the longest audio plus
        n_fft zeros instead: every frame that touches real samples then sees the same zeros after
        the audio and the same per-audio maximum for Whisper's dynamic-range clamp, so the valid
        frames equal the 300 s version (up to float rounding) at a fraction of the cost. Frames past
        the longest valid length are trimmed; the thinker ignores them through the mask anyway.
        """
        fe = self.feature_extractor
        longest = max(len(w) for w in waves) + fe.n_fft
        padded_len = -(-longest // fe.hop_length) * fe.hop_length
        out = fe(
            waves,
            sampling_rate=REASONER_RATE,
            padding="max_length",
            max_length=padded_len,
            truncation=False,
            return_attention_mask=True,
            return_tensors="np",
        )
        mask = out["attention_mask"].astype(np.int64)
        frames = int(mask.sum(-1).max())
        return out["input_features"][:, :, :frames].astype(np.float32), mask[:, :frames]

    def encode_conversation(self, conv: Conversation, max_audio_seconds: float = 300.0) -> ReasonerInputs:
        self._check_text(conv.system_prompt, "system prompt")
        messages: list[dict[str, object]] = [{"role": "system", "content": conv.system_prompt}]
        waves: list[np.ndarray] = []
        for n, turn in enumerate(conv.messages):
            parts: list[dict[str, str]] = []
            if turn.audio is not None:
                seconds = turn.audio.size / turn.sample_rate
                if seconds > max_audio_seconds:
                    raise InvalidInput(
                        f"turn {n} audio is {seconds:.1f} s long; the limit is {max_audio_seconds:.1f} s"
                    )
                waves.append(resample(turn.audio, turn.sample_rate, REASONER_RATE))
                parts.append({"type": "audio"})
            if turn.text:
                self._check_text(turn.text, f"turn {n} text")
                parts.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": parts})
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

        if not waves:
            return ReasonerInputs(
                input_ids=torch.tensor([ids], dtype=torch.long),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                input_features=None,
                feature_attention_mask=None,
            )
        features, feature_mask = self._features(waves)
        counts = [audio_token_count(int(f)) for f in feature_mask.sum(-1)]
        for n, (wave, count) in enumerate(zip(waves, counts)):
            if count < 1:
                ms = 1000 * len(wave) / REASONER_RATE
                raise InvalidInput(f"audio {n} is too short to encode ({ms:.1f} ms; needs more than 20 ms)")
        # <|AUDIO|> is an atomic added token, so expanding ids equals Qwen's expand-the-text-then-tokenise.
        expanded: list[int] = []
        pending = iter(counts)
        for token_id in ids:
            expanded.extend([token_id] * next(pending) if token_id == self.special_ids.audio else [token_id])
        return ReasonerInputs(
            input_ids=torch.tensor([expanded], dtype=torch.long),
            attention_mask=torch.ones(1, len(expanded), dtype=torch.long),
            input_features=torch.from_numpy(features),
            feature_attention_mask=torch.from_numpy(feature_mask),
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
