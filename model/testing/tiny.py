"""A complete tiny Chroma checkpoint with RANDOM WEIGHTS, in the official layout.

For tests and the local demo only: it loads in about a second on a CPU, but everything it says or speaks is
noise. Dimensions are the smallest that vLLM's CPU attention accepts (thinker head_dim 64); the special token
ids are remapped into a 4096-token vocabulary the way the upstream-parity fixture does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.chroma.config import ChromaConfig
from model.testing.processor_files import remapped_special_token_ids, write_processor_files

RANDOM_WEIGHTS_NOTICE = "RANDOM WEIGHTS: tiny test checkpoint, its speech and text are noise, not a real model"
TEXT_VOCAB = 4096
SPECIAL_BASE = 4043  # <|endoftext|>; the official ids are 151643 + offset


# Where the tools keep what they make (tiny checkpoints, the local cluster's data dir).
CHROMA_SERVE_HOME = Path(os.environ.get("CHROMA_SERVE_HOME", Path.home() / ".cache" / "chroma-serve"))
DEFAULT_TINY_DIR = CHROMA_SERVE_HOME / "tiny-seed0"


def ensure_tiny_checkpoint(path: Path = DEFAULT_TINY_DIR, seed: int = 0) -> Path:
    """The tiny checkpoint at `path`, written on first use."""
    if not (path / "config.json").is_file():
        write_tiny_checkpoint(path, seed=seed)
    return path


def uses_random_weights(path: str | Path) -> bool:
    """Whether a checkpoint directory is one of these (they carry RANDOM_WEIGHTS.txt)."""
    return (Path(path) / "RANDOM_WEIGHTS.txt").is_file()


def tiny_config() -> dict:
    ids = remapped_special_token_ids(SPECIAL_BASE)
    thinker_text = dict(
        model_type="qwen2_5_omni_text", vocab_size=TEXT_VOCAB, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64, hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "type": "mrope", "rope_theta": 1000000.0, "mrope_section": [16, 8, 8]},
    )
    thinker = dict(
        model_type="qwen2_5_omni_thinker",
        text_config=thinker_text,
        audio_config=dict(
            model_type="qwen2_5_omni_audio_encoder", d_model=64, encoder_layers=1, encoder_attention_heads=2,
            encoder_ffn_dim=128, num_mel_bins=128, output_dim=128, n_window=100, max_source_positions=1500,
        ),
        vision_config=dict(
            model_type="qwen2_5_omni_vision_encoder", depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
            out_hidden_size=128, fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, in_channels=3,
        ),
        audio_token_index=ids["audio"], audio_start_token_id=ids["audio_bos"],
        audio_end_token_id=ids["audio_eos"], image_token_index=ids["image"],
        video_token_index=ids["video"], vision_start_token_id=ids["vision_bos"],
        vision_end_token_id=ids["vision_eos"], position_id_per_seconds=25, seconds_per_chunk=2,
        user_token_id=872,
    )
    speech_common = dict(
        vocab_size=2051, audio_num_codebooks=8, hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False,
        mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    return dict(
        model_type="chroma",
        architectures=["ChromaForConditionalGeneration"],
        thinker_config=thinker,
        backbone_config=dict(
            speech_common, model_type="chroma_backbone", hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=2048,
        ),
        decoder_config=dict(
            speech_common, model_type="chroma_decoder", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            max_position_embeddings=33, audio_embedding_dim=128,
        ),
        codec_config=dict(
            model_type="mimi", sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=32,
            num_filters=8, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7,
            last_kernel_size=3, residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True,
            pad_mode="constant", compress=2, trim_right_ratio=1.0, codebook_size=2048, codebook_dim=32,
            num_quantizers=8, num_semantic_quantizers=1, upsample_groups=32, num_hidden_layers=1,
            intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16, hidden_act="gelu",
            max_position_embeddings=8000, sliding_window=250, norm_eps=1e-5, layer_scale_initial_scale=0.01,
            use_cache=False, use_streaming=False, vector_quantization_hidden_dimension=32,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        audio_num_codebooks=8,
        codebook_pad_token_id=2050,
        codebook_eos_token_id=0,
        text_start_token_id=ids["text_start"],
        text_end_token_id=ids["text_end"],
        im_end_token_id=ids["im_end"],
        audio_frame_freq=1920,
        dtype="float32",
    )


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """N(0, 1/fan_in) matrices, unit norms, zero biases: keeps activations O(1) through the tiny stacks."""
    for name, param in module.named_parameters():
        with torch.no_grad():
            if param.ndim >= 2:
                fan_in = param.shape[1] if param.ndim == 2 else math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    from transformers import MimiModel, Qwen2_5OmniThinkerForConditionalGeneration

    from model.chroma.speech import SpeechModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = tiny_config()
    config = ChromaConfig.model_validate(config_dict)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    write_processor_files(out, remapped_special_token_ids(SPECIAL_BASE), TEXT_VOCAB)
    thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config.thinker_hf_config())
    _randomise(thinker, generator)
    with torch.no_grad():
        # The tied head scores token t by its embedding row. Zero rows for the vocabulary the tiny tokenizer
        # never uses keep the random thinker's text made of real tokens; a larger im_end row makes it end.
        embed = thinker.model.embed_tokens.weight
        embed[_unused_token_ids(out)] = 0.0
        embed[config.im_end_token_id] *= 2.5
    speech = SpeechModel(config)
    _randomise(speech, generator)
    # Mimi keeps transformers' own init (std 0.02), which keeps its random output near unit scale.
    codec = MimiModel(config.codec_hf_config())

    state = {}
    state.update({f"thinker.{k}": v for k, v in thinker.state_dict().items() if k != "lm_head.weight"})
    # Upstream's save_pretrained writes one side of each tie: the thinker's embedding (which the speech stack
    # borrows as its text embedding) and the decoder's audio embedding.
    state.update({
        k: v for k, v in speech.state_dict().items()
        if k != "text_embedding.weight" and not k.startswith("backbone.audio_embedding.")
    })
    state.update({f"codec_model.{k}": v for k, v in codec.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})

    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 250}, indent=2))
    (out / "RANDOM_WEIGHTS.txt").write_text(RANDOM_WEIGHTS_NOTICE + "\n")
    return out


def _unused_token_ids(path: Path) -> list[int]:
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    return [i for token, i in vocab.items() if token.startswith("<|unused_")] + list(range(SPECIAL_BASE + 24, TEXT_VOCAB))
