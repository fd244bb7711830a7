"""Tokenizer, chat template and feature-extractor files for tiny test checkpoints.

A small byte-level BPE (Qwen2's normaliser, pre-tokeniser and decoder) whose special ids sit exactly where the
checkpoint's config expects them, loadable offline by transformers' Qwen2Tokenizer and by vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from model.processing.audio import REASONER_RATE
from model.processing.processor import SPECIAL_TOKENS

MODEL_MAX_LENGTH = 32768

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
    "sampling_rate": REASONER_RATE,
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

