"""Upstream-parity check on a fixture directory made by the reference implementation.

A fixture is a checkpoint plus `inputs.safetensors` (what upstream `generate` received, batch of one),
`expected.safetensors` (`frames` [1, T, 8], `audio` [1, 1, S]) and `expected.json` (`text_tokens`,
`max_new_frames`). Parity: identical text tokens and frames (every codebook), audio within tolerance.

Audio tolerance: 1e-4 absolute for audio in [-1, 1]. Random-weight codecs emit samples of magnitude ~1e4,
where float32 itself only resolves ~1e-3 and two correct float32 decodes (different thread counts or CPU
kernels) differ by ~1e-2; there the bound scales with the peak: 1e-4 x max(1, peak |expected|).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from model.chroma.checkpoint import Checkpoint, load_codec, load_speech, load_thinker
from model.chroma.codec import encode_voice
from model.offline import generate_turn
from model.processing.processor import ReasonerInputs

AUDIO_TOLERANCE = 1e-4


@dataclass
class ParityItem:
    name: str
    ok: bool
    detail: str


def run_fixture(path: str | Path) -> list[ParityItem]:
    path = Path(path)
    for name in ("inputs.safetensors", "expected.safetensors", "expected.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"parity fixture {path} lacks {name}")
    checkpoint = Checkpoint(path)
    thinker, speech, codec = load_thinker(checkpoint), load_speech(checkpoint), load_codec(checkpoint)
    inputs = load_file(path / "inputs.safetensors")
    expected = load_file(path / "expected.safetensors")
    expected_meta = json.loads((path / "expected.json").read_text())
    if expected_meta.get("do_sample"):
        raise ValueError("parity fixtures must be greedy (do_sample false)")

    conversation = ReasonerInputs(
        input_ids=inputs["thinker_input_ids"],
        attention_mask=inputs["thinker_attention_mask"],
        input_features=inputs.get("thinker_input_features"),
        feature_attention_mask=inputs.get("thinker_feature_attention_mask"),
    )
    transcript = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    cutoff = int(inputs["input_values_cutoffs"].reshape(-1)[0])
    voice = encode_voice(codec, checkpoint.config, transcript, inputs["input_values"], num_samples=cutoff)
    result = generate_turn(thinker, speech, codec, conversation, voice, max_frames=int(expected_meta["max_new_frames"]))

    items = []
    want_text = list(expected_meta["text_tokens"])
    items.append(ParityItem(
        "text tokens", result.text_tokens == want_text,
        f"got {len(result.text_tokens)} {result.text_tokens}, expected {len(want_text)} {want_text}",
    ))
    want_frames = expected["frames"][0]
    same_shape = tuple(result.frames.shape) == tuple(want_frames.shape)
    if same_shape:
        mismatched = (result.frames != want_frames).any(dim=1).nonzero().flatten().tolist()
        detail = f"{want_frames.shape[0]} frames x {want_frames.shape[1]} codebooks, " + (
            "all identical" if not mismatched else f"{len(mismatched)} differ, first at frame {mismatched[0]}"
        )
        items.append(ParityItem("frames", not mismatched, detail))
    else:
        items.append(ParityItem("frames", False, f"shape {tuple(result.frames.shape)} != expected {tuple(want_frames.shape)}"))
    want_audio = expected["audio"].reshape(-1)
    if result.audio.numel() == want_audio.numel():
        diff = float((result.audio - want_audio).abs().max())
        bound = AUDIO_TOLERANCE * max(1.0, float(want_audio.abs().max()))
        items.append(ParityItem("audio", diff <= bound, f"{want_audio.numel()} samples, max abs diff {diff:.3g} (bound {bound:.3g})"))
    else:
        items.append(ParityItem("audio", False, f"{result.audio.numel()} samples != expected {want_audio.numel()}"))
    return items
