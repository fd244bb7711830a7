"""The gpt-fast-style stack against transformers' Llama: same weights, same outputs."""

import pytest
import torch
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model.chroma.config import SpeechTransformerConfig
from model.chroma.layers import RotaryEmbedding, StepInputs, TransformerStack
from tests.conftest import cuda_layout_sdpa

ROPES = [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
]


def config(rope):
    return SpeechTransformerConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=2048, rope_parameters=rope,
    )


def hf_llama(cfg):
    return LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=cfg.rope_parameters, vocab_size=8,
    )


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r["rope_type"])
def test_rotary_tables_match_transformers(rope):
    cfg = config(rope)
    positions = torch.arange(300)[None]
    cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_llama(cfg))(torch.zeros(1, 300, cfg.hidden_size), positions)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r["rope_type"])
def test_stack_with_cache_matches_llama(rope):
    torch.manual_seed(0)
    cfg = config(rope)
    hf = LlamaModel(hf_llama(cfg)).eval()
    ours = TransformerStack(cfg)
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith("embed_tokens")})
    x = torch.randn(1, 40, cfg.hidden_size)
    with torch.no_grad():
        expected = hf(inputs_embeds=x).last_hidden_state
        # Ours in three pieces through the KV cache: a 30-position prefill, then 3, then 7 positions.
        cache = ours.allocate_cache(rows=1, capacity=64)
        pieces, start = [], 0
        for length in (30, 3, 7):
            step = StepInputs.contiguous([0], [start], [length], "cpu")
            pieces.append(ours(x[:, start:start + length], cache, step))
            start += length
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_padded_rows_do_not_disturb_each_other():
    torch.manual_seed(1)
    cfg = config(ROPES[0])
    stack = TransformerStack(cfg).eval()
    a, b = torch.randn(1, 5, cfg.hidden_size), torch.randn(1, 2, cfg.hidden_size)
    with torch.no_grad():
        solo_cache = stack.allocate_cache(rows=2, capacity=16)
        solo_a = stack(a, solo_cache, StepInputs.contiguous([0], [0], [5], "cpu"))
        solo_b = stack(b, solo_cache, StepInputs.contiguous([1], [0], [2], "cpu"))
        cache = stack.allocate_cache(rows=2, capacity=16)
        batch = torch.zeros(2, 5, cfg.hidden_size)
        batch[0], batch[1, :2] = a[0], b[0]
        out = stack(batch, cache, StepInputs.contiguous([0, 1], [0, 0], [5, 2], "cpu"))
    torch.testing.assert_close(out[0], solo_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :2], solo_b[0], rtol=1e-5, atol=1e-5)
    assert not cache.visible[1, 2:].any()  # padding went to the scratch column, invisible


def test_attention_takes_sdpa_outputs_in_the_cuda_layout():
    """CUDA's SDPA returns a non-contiguous output; the stack gives the same outputs as with the CPU's contiguous
    one, at batch > 1, over several query positions, with padding and through the cache."""
    torch.manual_seed(2)
    cfg = config(ROPES[0])  # 4 query heads over 2 kv heads: the folded output is no plain view of [B, H, L, d]
    stack = TransformerStack(cfg).eval()
    x = torch.randn(3, 4, cfg.hidden_size)

    def run():
        cache = stack.allocate_cache(rows=3, capacity=16)
        with torch.no_grad():
            first = stack(x, cache, StepInputs.contiguous([0, 1, 2], [0, 0, 0], [4, 2, 3], "cpu"))
            second = stack(x[:, :1], cache, StepInputs.contiguous([0, 1, 2], [4, 2, 3], [1, 1, 1], "cpu"))
        return first, second

    expected = run()
    with cuda_layout_sdpa():
        assert not torch.nn.functional.scaled_dot_product_attention(*[torch.randn(2, 2, 3, 4)] * 3).is_contiguous()
        got = run()
    for want, have in zip(expected, got):
        assert torch.equal(want, have)
