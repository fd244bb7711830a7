"""Speech models (Backbone + Decoder) with RANDOM weights, built in memory at a chosen size: Chroma-4B's own for the
GPU benchmark, smaller ones with the same head layouts for tests. Needs only torch and pydantic (no audio or
tokenizer libraries), so the CUDA tests can run on a bare GPU machine."""

from __future__ import annotations

import torch

from model.chroma.config import BACKBONE_DEFAULTS, DECODER_DEFAULTS, ChromaConfig
from model.chroma.speech import SpeechModel

TEXT_VOCAB = 4096  # the tiny checkpoints' text vocabulary, with their special ids
SPECIAL_IDS = {"im_end_token_id": 4045, "text_start_token_id": 4065, "text_end_token_id": 4066}


def speech_config(backbone: dict | None = None, decoder: dict | None = None, text_vocab: int = TEXT_VOCAB) -> ChromaConfig:
    """Chroma-4B's Backbone and Decoder (config.py's defaults) with `backbone` / `decoder` fields overridden. The
    thinker is only its text embedding here, as wide as the Backbone."""
    backbone = {**BACKBONE_DEFAULTS, **(backbone or {})}
    decoder = {**DECODER_DEFAULTS, "audio_embedding_dim": backbone["hidden_size"], **(decoder or {})}
    ids = SPECIAL_IDS if text_vocab == TEXT_VOCAB else {}
    return ChromaConfig.model_validate({
        "thinker_config": {"text_config": {"hidden_size": backbone["hidden_size"], "vocab_size": text_vocab}},
        "backbone_config": backbone, "decoder_config": decoder,
        "codec_config": {"codebook_size": 2048, "sampling_rate": 24000}, **ids,
    })


def random_speech(config: ChromaConfig, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> SpeechModel:
    """N(0, 1/fan_in) matrices (O(1) activations, like trained weights), unit norms."""
    torch.manual_seed(seed)
    with torch.device(device):
        speech = SpeechModel(config).to(dtype)
    for param in speech.parameters():
        if param.ndim >= 2:
            torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    speech.tie_weights()
    return speech.eval()
