import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from model.processing.audio import resample
from model.processing.processor import SPECIAL_TOKENS, ChromaProcessor, Conversation, Message, audio_token_count
from model.testing.processor_files import official_special_token_ids, remapped_special_token_ids, write_processor_files

VOCAB = 4096
IDS = remapped_special_token_ids()
CONFIG = {
    "model_type": "chroma",
    "thinker_config": {"audio_token_index": 4046, "audio_start_token_id": 4047, "audio_end_token_id": 4048},
    "text_start_token_id": 4065,
    "text_end_token_id": 4066,
    "im_end_token_id": 4045,
}
ENGLISH = [
    "Hello, how are you today?",
    "I'd like to book a table for two at 7:30 pm, please.",
    "Zebras quietly juxtapose xylophones; nobody knows why!",
    "Café au lait costs €3.50 — naïve pricing?",
    "  leading and trailing spaces\nand a new line  ",
]


def tone(rate: int, seconds: float, freq: float = 300.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    write_processor_files(path, IDS, VOCAB)
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def proc(ckpt: Path) -> ChromaProcessor:
    return ChromaProcessor.from_pretrained(ckpt)


def test_id_helpers() -> None:
    official = official_special_token_ids()
    assert official["endoftext"] == 151643 and official["audio"] == 151646 and official["video"] == 151656
    assert (official["text_start"], official["text_end"]) == (151665, 151666)
    assert IDS == {k: v - 151643 + 4043 for k, v in official.items()}
    assert (IDS["im_end"], IDS["audio"], IDS["text_start"], IDS["text_end"]) == (4045, 4046, 4065, 4066)


def test_special_tokens_are_single_ids(ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    assert len(tok) <= VOCAB
    for key, token_id in IDS.items():
        text = SPECIAL_TOKENS[key]
        assert tok(text, add_special_tokens=False)["input_ids"] == [token_id], key
        assert tok.convert_ids_to_tokens(token_id) == text
    # Never split or merged with neighbouring text.
    ids = tok("hello<|AUDIO|>world<|text_end|>", add_special_tokens=False)["input_ids"]
    assert ids.count(IDS["audio"]) == 1 and ids.count(IDS["text_end"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.audio_token == "<|AUDIO|>"


def test_english_round_trip(ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    for text in ENGLISH:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < min(IDS.values())
        assert tok.decode(ids) == text
    # The tiny BPE does merge common English, not just bytes.
    assert len(tok(ENGLISH[0])["input_ids"]) < len(ENGLISH[0]) / 2


def test_files_are_deterministic(ckpt: Path, tmp_path: Path) -> None:
    write_processor_files(tmp_path, IDS, VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (tmp_path / name).read_bytes() == (ckpt / name).read_bytes(), name


def test_write_rejects_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit in vocab_size 4050"):
        write_processor_files(tmp_path, IDS, 4050)
    with pytest.raises(ValueError, match="missing \\['text_end'\\]"):
        write_processor_files(tmp_path, {k: v for k, v in IDS.items() if k != "text_end"}, VOCAB)


def expected_tokens(n_frames: int) -> int:
    # Qwen2.5-Omni audio encoder: conv stride 2, then 2x pooling.
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1


def test_audio_token_count_matches_transformers() -> None:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    lengths = torch.arange(1, 3001)
    _, reference = Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, lengths)
    assert [audio_token_count(int(n)) for n in lengths] == reference.tolist()


def test_conversation_layout(proc: ChromaProcessor) -> None:
    a1, a2 = tone(16000, 1.0), tone(24000, 0.73)
    conv = Conversation(
        "You are Chroma.",
        [
            Message("user", audio=a1, sample_rate=16000),
            Message("assistant", text="Hello there."),
            Message("user", audio=a2, sample_rate=24000),
        ],
    )
    out = proc.encode_conversation(conv)
    ids = out.input_ids[0].tolist()
    assert out.input_ids.dtype == torch.long and out.attention_mask.tolist() == [[1] * len(ids)]

    frames = [math.ceil(16000 / 160), math.ceil(len(resample(a2, 24000, 16000)) / 160)]
    runs, collapsed = [], []
    for token_id in ids:
        if token_id == IDS["audio"] and collapsed[-1] == IDS["audio"]:
            runs[-1] += 1
            continue
        if token_id == IDS["audio"]:
            runs.append(1)
        collapsed.append(token_id)
    assert runs == [expected_tokens(f) for f in frames] == [25, 18]

    template = (
        "<|im_start|>system\nYou are Chroma.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\nHello there.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert collapsed == proc.tokenizer(template, add_special_tokens=False)["input_ids"]

    assert out.input_features.shape == (2, 128, max(frames))
    assert out.input_features.dtype == torch.float32
    assert out.feature_attention_mask.dtype == torch.long
    assert out.feature_attention_mask.sum(-1).tolist() == frames


def test_single_audio_features_match_qwen_padding(proc: ChromaProcessor) -> None:
    wave = tone(16000, 1.3) + 0.01 * np.random.default_rng(0).standard_normal(20800).astype(np.float32)
    out = proc.encode_conversation(Conversation("s", [Message("user", audio=wave, sample_rate=16000)]))
    n_frames = math.ceil(len(wave) / 160)
    assert out.input_features.shape == (1, 128, n_frames)
    # Qwen2_5OmniProcessor pads every audio to chunk_length (300 s); the valid frames must agree.
    ref = proc.feature_extractor(
        [wave], sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np"
    )
    assert int(ref["attention_mask"].sum()) == n_frames
    np.testing.assert_allclose(out.input_features[0].numpy(), ref["input_features"][0, :, :n_frames], atol=1e-5)


def test_resamples_8khz_audio(proc: ChromaProcessor) -> None:
    wave = tone(8000, 0.5)
    out = proc.encode_conversation(Conversation("s", [Message("user", audio=wave, sample_rate=8000, text="hi")]))
    assert out.feature_attention_mask.sum().item() == math.ceil(8000 / 160)
    assert (out.input_ids == IDS["audio"]).sum().item() == expected_tokens(50)
    # Audio comes before the text in a user turn.
    assert proc.decode_text(out.input_ids).endswith("user\nhi\nassistant\n")


def test_text_only_conversation(proc: ChromaProcessor) -> None:
    out = proc.encode_conversation(Conversation("Be brief.", [Message("user", text="What time is it?")]))
    assert out.input_features is None and out.feature_attention_mask is None
    assert proc.decode_text(out.input_ids) == "system\nBe brief.\nuser\nWhat time is it?\nassistant\n"


def test_a_conversation_as_it_stands_is_answered_with_no_new_message(proc: ChromaProcessor) -> None:
    """A reply with no new caller message (a greeting, or a realtime response.create with no input)."""
    assert proc.decode_text(proc.encode_conversation(Conversation("Greet.", [])).input_ids) == "system\nGreet.\nassistant\n"
    after_reply = Conversation("s", [Message("user", text="hi"), Message("assistant", text="yo")])
    assert proc.decode_text(proc.encode_conversation(after_reply).input_ids) == "system\ns\nuser\nhi\nassistant\nyo\nassistant\n"


def test_a_system_message_in_the_conversation_follows_the_system_prompt_in_its_place(proc: ChromaProcessor) -> None:
    """A client's note (a realtime system item) is a system message where it was added, after the session's own."""
    conv = Conversation("s", [Message("user", text="hi"), Message("system", text="Be kind."),
                              Message("assistant", text="yo")])
    ids = proc.encode_conversation(conv).input_ids[0].tolist()
    template = ("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>system\nBe kind.<|im_end|>\n"
                "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n")
    assert ids == proc.tokenizer(template, add_special_tokens=False)["input_ids"]


def test_voice_prompt(proc: ChromaProcessor) -> None:
    transcript = "Hello, this is my voice."
    vp = proc.encode_voice_prompt(transcript, tone(16000, 1.0), 16000)
    assert vp.text_ids.dtype == torch.long and vp.text_ids.shape[0] == 1
    assert vp.text_ids.max().item() < min(IDS.values())
    assert proc.decode_text(vp.text_ids) == transcript
    assert vp.input_values.shape == (1, 1, 24000) and vp.input_values.dtype == torch.float32
    assert vp.num_samples == 24000
    assert proc.encode_voice_prompt("hi", tone(44100, 0.5), 44100).num_samples == 12000


def test_decode_text_skips_special_tokens(proc: ChromaProcessor) -> None:
    ids = [IDS["text_start"]] + proc.tokenizer("Good morning.")["input_ids"] + [IDS["im_end"]]
    assert proc.decode_text(ids) == "Good morning."
    assert proc.decode_text(torch.tensor([ids])) == "Good morning."


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Message("user"), "neither text nor audio"),
        (lambda: Message("user", text=""), "neither text nor audio"),
        (lambda: Message("user", audio=np.zeros((100, 2), np.float32), sample_rate=16000), "mono"),
        (lambda: Message("user", audio=np.zeros(100, np.float32)), "sample_rate"),
        (lambda: Message("user", audio=np.zeros(100, np.int16), sample_rate=16000), "float samples"),
        (lambda: Message("user", audio=np.zeros(0, np.float32), sample_rate=16000), "turn audio is empty"),
        (lambda: Message("assistant", audio=np.zeros(100, np.float32), sample_rate=16000), "text only"),
        (lambda: Message("tool", text="x"), "role"),  # type: ignore[arg-type]
        (lambda: Message("system"), "system turn has no text"),
        (lambda: Message("system", text="x", audio=np.zeros(100, np.float32), sample_rate=16000), "text only"),
    ],
)
def test_conversation_validation(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_encode_errors(proc: ChromaProcessor) -> None:
    long = Conversation("s", [Message("user", audio=tone(8000, 2.0), sample_rate=8000)])
    with pytest.raises(ValueError, match="2.0 s long; the limit is 1.0 s"):
        proc.encode_conversation(long, max_audio_seconds=1.0)
    short = Conversation("s", [Message("user", audio=tone(16000, 0.01), sample_rate=16000)])
    with pytest.raises(ValueError, match="too short"):
        proc.encode_conversation(short)
    with pytest.raises(ValueError, match="reserved token <\\|AUDIO\\|>"):
        proc.encode_conversation(Conversation("s", [Message("user", text="say <|AUDIO|>")]))
    with pytest.raises(ValueError, match="voice prompt transcript is empty"):
        proc.encode_voice_prompt("  \n", tone(16000, 1.0), 16000)
    with pytest.raises(ValueError, match="voice prompt audio is empty"):
        proc.encode_voice_prompt("hi", np.zeros(0, np.float32), 16000)


def test_from_pretrained_missing_pieces(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        ChromaProcessor.from_pretrained(tmp_path)
    write_processor_files(tmp_path, IDS, VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "thinker_config": {}}))
    with pytest.raises(ValueError, match="audio_token_index"):
        ChromaProcessor.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "im_end_token_id": 4044}))
    with pytest.raises(ValueError, match="config.json says 4044"):
        ChromaProcessor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChromaProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ChromaProcessor.from_pretrained(tmp_path)
