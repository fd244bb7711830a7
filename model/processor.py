"""Text + audio processor for the Chroma thinker (Qwen2.5-Omni layout).

transformers' Qwen2_5OmniProcessor cannot be built without torchvision (its video processor), so this
module reproduces its text and audio behaviour: the Qwen2.5-Omni chat template, Whisper log-mel
features, and one <|AUDIO|> id per audio-encoder output frame. It also writes a small offline
tokenizer for tiny test checkpoints whose special ids sit where Chroma expects them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer, WhisperFeatureExtractor

from model.audio import resample

FEATURE_RATE = 16000  # the thinker's audio encoder input rate
VOICE_PROMPT_RATE = 24000  # Mimi's rate
MODEL_MAX_LENGTH = 32768

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
_OFFICIAL_IDS: dict[str, int] = {
    **{key: 151643 + i for i, key in enumerate(list(SPECIAL_TOKENS)[:14])},
    "text_start": 151665,
    "text_end": 151666,
}
_OFFICIAL_FIRST_ID = 151643

# Same regex as transformers' Qwen2Tokenizer, so text splits the way the real tokenizer splits it.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-Omni's chat template, verbatim: a default system prompt only when the first message is
# not a system message; content is a string or a list of typed parts.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-Omni's preprocessor_config.json: the Whisper front end, plus the image keys so that the
# stock Qwen2_5OmniProcessor (vLLM on a GPU host) can load the same directory.
PREPROCESSOR_CONFIG: dict[str, object] = {
    "processor_class": "Qwen2_5OmniProcessor",
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": FEATURE_RATE,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 300,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "dither": 0.0,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}

# Training text for the tiny byte-level BPE used by test checkpoints. Any byte sequence still
# tokenises (the 256 byte tokens are always present); this only makes ordinary English compact.
TOKENIZER_CORPUS = """\
Hello, and thank you for calling. How can I help you today? I would like to check the status of my
order, please. Of course. Could you tell me your name and the order number? My name is Sarah, and
the number is four, seven, two, nine. Thank you, Sarah. Your order left our warehouse this morning
and should arrive on Thursday afternoon. That is great news. Is there anything else I can do for you?

The weather today will be mostly sunny with a light breeze from the west. Temperatures will reach
about twenty degrees in the afternoon, and the evening should be clear and cool. Tomorrow there is a
chance of rain in the morning, so you may want to bring an umbrella when you leave the house.

A good conversation is a little like a walk with a friend. You listen, you answer, and sometimes you
stop to think about what the other person said. People speak in short sentences, they change their
minds, and they laugh. A voice assistant should be patient, polite and quick, and it should never
interrupt. When it does not know the answer, it should say so and offer to find out.

The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. One, two, three,
four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and
Sunday. January, February, March, April, May, June, July, August, September, October, November and
December. Yes, no, maybe, sure, okay, sorry, please, thanks, goodbye.

Where would you like to go this weekend? We could visit the museum in the city, walk along the river,
or stay at home and cook something new. I think the museum is a lovely idea, because they have opened
a new exhibition about music and sound. Let's meet at ten o'clock near the main entrance.
"""


def official_special_token_ids() -> dict[str, int]:
    """Special token ids of the official Chroma / Qwen2.5-Omni tokenizer, by key."""
    return dict(_OFFICIAL_IDS)


def remapped_special_token_ids(vocab_size_reserved_from: int = 4043) -> dict[str, int]:
    """The official layout shifted so that <|endoftext|> lands on `vocab_size_reserved_from`."""
    return {key: i - _OFFICIAL_FIRST_ID + vocab_size_reserved_from for key, i in _OFFICIAL_IDS.items()}


def _check_special_ids(special_token_ids: dict[str, int], vocab_size: int) -> None:
    missing = [key for key in SPECIAL_TOKENS if key not in special_token_ids]
    if missing:
        raise ValueError(f"special_token_ids is missing {missing}")
    unknown = sorted(set(special_token_ids) - set(SPECIAL_TOKENS))
    if unknown:
        raise ValueError(f"special_token_ids has unknown keys {unknown}")
    if len(set(special_token_ids.values())) != len(special_token_ids):
        raise ValueError("special_token_ids has duplicate ids")
    lowest, highest = min(special_token_ids.values()), max(special_token_ids.values())
    if lowest < 512:
        raise ValueError(f"smallest special id {lowest} leaves no room for a byte-level BPE (need >= 512)")
    if highest >= vocab_size:
        raise ValueError(f"special id {highest} does not fit in vocab_size {vocab_size}")


def _build_tokenizer(special_token_ids: dict[str, int]) -> Tokenizer:
    """Byte-level BPE with Qwen2's normaliser, pre-tokeniser and decoder, specials at exact ids."""
    first_special = min(special_token_ids.values())
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trained = Tokenizer(BPE())
    trained.normalizer = normalizers.NFC()
    trained.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=first_special,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer)
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    # Added tokens take the next free ids, so the regular vocabulary must end exactly at the first
    # special id: pad it with entries no merge can produce.
    for i in range(len(vocab), first_special):
        vocab[f"<|unused_{i}|>"] = i
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]], fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()

    by_id = {i: SPECIAL_TOKENS[key] for key, i in special_token_ids.items()}
    for i in range(first_special, max(by_id) + 1):
        # Gaps between the specials get placeholders so every later id lines up.
        text = by_id.get(i, f"<|reserved_{i - first_special}|>")
        tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if tokenizer.token_to_id(text) != i:
            raise RuntimeError(f"{text} got id {tokenizer.token_to_id(text)}, expected {i}")
    return tokenizer


def write_processor_files(out_dir: Path, special_token_ids: dict[str, int], vocab_size: int) -> None:
    """Write tokenizer, chat template and feature-extractor files loadable offline by transformers."""
    _check_special_ids(special_token_ids, vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(special_token_ids).save(str(out_dir / "tokenizer.json"), pretty=True)
    # Mirrors Qwen2.5-Omni's tokenizer_config.json; the *_token keys give tokenizer.audio_token etc.
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "processor_class": "Qwen2_5OmniProcessor",
        "model_max_length": MODEL_MAX_LENGTH,
        "eos_token": SPECIAL_TOKENS["im_end"],
        "pad_token": SPECIAL_TOKENS["endoftext"],
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "audio_token": SPECIAL_TOKENS["audio"],
        "audio_bos_token": SPECIAL_TOKENS["audio_bos"],
        "audio_eos_token": SPECIAL_TOKENS["audio_eos"],
        "image_token": SPECIAL_TOKENS["image"],
        "video_token": SPECIAL_TOKENS["video"],
        "vision_bos_token": SPECIAL_TOKENS["vision_bos"],
        "vision_eos_token": SPECIAL_TOKENS["vision_eos"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")


def _mono_float(audio: np.ndarray, what: str) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"{what} must be mono (1-D), got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError(f"{what} is empty")
    # Integer PCM would pass through unscaled and reach the model as loud garbage.
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{what} must be float samples in [-1, 1], got {audio.dtype}")
    return audio.astype(np.float32, copy=False)


@dataclass
class Turn:
    """One conversation turn: user turns carry audio and/or text, assistant turns carry text."""

    role: Literal["user", "assistant"]
    text: str | None = None
    audio: np.ndarray | None = None
    sample_rate: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"turn role must be 'user' or 'assistant', got {self.role!r}")
        if not self.text and self.audio is None:
            raise ValueError(f"{self.role} turn has neither text nor audio")
        if self.audio is None:
            return
        if self.role != "user":
            raise ValueError("assistant turns carry text only; audio is accepted in user turns")
        self.audio = _mono_float(self.audio, "turn audio")
        if self.sample_rate is None or self.sample_rate <= 0:
            raise ValueError(f"turn audio needs a positive sample_rate, got {self.sample_rate}")


@dataclass
class Conversation:
    system_prompt: str
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError("conversation has no turns")
        if self.turns[-1].role != "user":
            raise ValueError(f"the last turn must be a user turn, got {self.turns[-1].role!r}")


@dataclass
class ThinkerInputs:
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
        if feature_extractor.sampling_rate != FEATURE_RATE:
            raise ValueError(
                f"feature extractor runs at {feature_extractor.sampling_rate} Hz, expected {FEATURE_RATE}"
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
                raise ValueError(f"{what} contains the reserved token {token}")

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
            sampling_rate=FEATURE_RATE,
            padding="max_length",
            max_length=padded_len,
            truncation=False,
            return_attention_mask=True,
            return_tensors="np",
        )
        mask = out["attention_mask"].astype(np.int64)
        frames = int(mask.sum(-1).max())
        return out["input_features"][:, :, :frames].astype(np.float32), mask[:, :frames]

    def encode_conversation(self, conv: Conversation, max_audio_seconds: float = 300.0) -> ThinkerInputs:
        self._check_text(conv.system_prompt, "system prompt")
        messages: list[dict[str, object]] = [{"role": "system", "content": conv.system_prompt}]
        waves: list[np.ndarray] = []
        for n, turn in enumerate(conv.turns):
            parts: list[dict[str, str]] = []
            if turn.audio is not None:
                seconds = turn.audio.size / turn.sample_rate
                if seconds > max_audio_seconds:
                    raise ValueError(
                        f"turn {n} audio is {seconds:.1f} s long; the limit is {max_audio_seconds:.1f} s"
                    )
                waves.append(resample(turn.audio, turn.sample_rate, FEATURE_RATE))
                parts.append({"type": "audio"})
            if turn.text:
                self._check_text(turn.text, f"turn {n} text")
                parts.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": parts})
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

        if not waves:
            return ThinkerInputs(
                input_ids=torch.tensor([ids], dtype=torch.long),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                input_features=None,
                feature_attention_mask=None,
            )
        features, feature_mask = self._features(waves)
        counts = [audio_token_count(int(f)) for f in feature_mask.sum(-1)]
        for n, (wave, count) in enumerate(zip(waves, counts)):
            if count < 1:
                ms = 1000 * len(wave) / FEATURE_RATE
                raise ValueError(f"audio {n} is too short to encode ({ms:.1f} ms; needs more than 20 ms)")
        # <|AUDIO|> is an atomic added token, so expanding ids equals Qwen's expand-the-text-then-tokenise.
        expanded: list[int] = []
        pending = iter(counts)
        for token_id in ids:
            expanded.extend([token_id] * next(pending) if token_id == self.special_ids.audio else [token_id])
        return ThinkerInputs(
            input_ids=torch.tensor([expanded], dtype=torch.long),
            attention_mask=torch.ones(1, len(expanded), dtype=torch.long),
            input_features=torch.from_numpy(features),
            feature_attention_mask=torch.from_numpy(feature_mask),
        )

    def encode_voice_prompt(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePromptInputs:
        if not transcript.strip():
            raise ValueError("voice prompt transcript is empty")
        self._check_text(transcript, "voice prompt transcript")
        audio = _mono_float(audio, "voice prompt audio")
        text_ids = self.tokenizer(transcript, add_special_tokens=False)["input_ids"]
        wave = resample(audio, sample_rate, VOICE_PROMPT_RATE)
        return VoicePromptInputs(
            text_ids=torch.tensor([text_ids], dtype=torch.long),
            input_values=torch.from_numpy(wave).reshape(1, 1, -1),
            num_samples=len(wave),
        )

    def decode_text(self, token_ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            token_ids = token_ids.reshape(-1).tolist()
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
