"""CUDA only (skipped without a GPU; `loadtest/gpu_check.sh` runs it there): the CUDA-graph speech engine and codec
replay exactly what their padded eager step computes, in float32 and bfloat16, and in float32 they equal the eager
engine and the offline loop. RANDOM weights: a mid-size speech model built in memory, the tiny Mimi.

Needs only torch, transformers and pydantic (no Ray, vLLM, Redis or audio libraries): it runs with --noconftest.
"""

import asyncio
import os

import pytest
import torch

from model.chroma.sampling import SamplingParams
from model.chroma.speech import SpeechModel
from model.chroma.turn import VoicePrompt
from model.engines.codec import CodecEngine
from model.engines.speech import SpeechEngine
from model.offline import speak_turn
from model.settings import SpeechEngineSettings
from model.testing.random_speech import random_speech, speech_config

# CHROMA_CUDA_TESTS_DEVICE=cpu (gpu_check.sh --dry-run) runs them on the CPU, graphs replaced by their padded eager
# step: a check of the tests themselves, so the GPU run cannot fail on a Python error.
DEVICE = os.environ.get("CHROMA_CUDA_TESTS_DEVICE", "cuda")
GRAPHS = "cuda_graphs" if DEVICE == "cuda" else "padded"
COMPILED_GRAPHS, COMPILE_BACKEND = ("compiled_graphs", "inductor") if DEVICE == "cuda" else ("compiled", "eager")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.bfloat16]


MID_SIZE = speech_config(  # the Chroma-4B head layout (GQA 4:1 in the backbone), smaller widths
    {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
     "head_dim": 64},
    {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
     "head_dim": 64},
)
FULL_HEADS = speech_config(  # Chroma-4B's widths and heads (decoder head_dim 128), two layers each, a short context
    {"num_hidden_layers": 2, "intermediate_size": 2048, "max_position_embeddings": 256},
    {"num_hidden_layers": 2, "intermediate_size": 2048},
)


def random_model(dtype: torch.dtype, config=MID_SIZE) -> SpeechModel:
    return random_speech(config, DEVICE, dtype)


def voice(seed: int) -> VoicePrompt:
    generator = torch.Generator().manual_seed(seed)
    frames = 20 + 5 * seed
    return VoicePrompt(torch.randint(0, 4000, (8 + seed,), generator=generator),
                       torch.randint(1, 2048, (frames, 8), generator=generator), frames)


def pairs(speech: SpeechModel, seed: int, count: int = 12):
    generator = torch.Generator().manual_seed(100 + seed)
    hidden = speech.config.backbone_config.hidden_size
    out = [(int(torch.randint(0, 4000, (1,), generator=generator)), torch.randn(hidden, generator=generator)) for _ in range(count - 1)]
    return out + [(speech.config.im_end_token_id, torch.randn(hidden, generator=generator))]


async def as_stream(items, delay: float = 0.0):
    for item in items:
        if delay:
            await asyncio.sleep(delay)
        yield item


PLANS = [(0, 0, 24, 0.0), (1, 1, 30, 0.001), (2, 2, 18, 0.0), (3, 0, 26, 0.002)]  # (seed, voice, frames, pair delay)


PLANS_8 = [(seed, seed % 3, 14 + seed, 0.0005 * (seed % 2)) for seed in range(8)]  # batch buckets 1, 2, 4 and 8


def run_engine(speech: SpeechModel, mode: str, sampling: SamplingParams | None = None, plans=PLANS, slots: int = 4) -> tuple[list, dict]:
    async def main():
        engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=slots, step_mode=mode, compile_backend=COMPILE_BACKEND))
        tasks = []
        for seed, v, frames, delay in plans:
            stream = await engine.submit(f"t{seed}", voice(v), as_stream(pairs(speech, seed), delay), sampling=sampling, max_frames=frames)
            tasks.append(asyncio.create_task(collect(stream)))
            await asyncio.sleep(0.01)  # later turns join a running batch
        results = await asyncio.gather(*tasks)
        stats = engine.stats()
        await engine.close()
        return results, stats

    return asyncio.run(main())


async def collect(stream):
    return [f.codes async for f in stream if f.codes is not None]


def offline(speech: SpeechModel, seed: int, v: int, frames: int, sampling=None) -> list:
    items = iter(pairs(speech, seed))
    return speak_turn(speech, voice(v), lambda _: next(items), frames, sampling).frames


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_graph_frames_equal_the_padded_eager_step(dtype):
    speech = random_model(dtype)
    graphs, stats = run_engine(speech, GRAPHS)
    padded, _ = run_engine(speech, "padded")
    assert stats.step_mode == GRAPHS and (stats.cuda_graphs > 0 or DEVICE != "cuda")
    assert stats.eager_fallback_buckets == 0, stats
    assert graphs == padded


def test_float32_graph_frames_equal_the_eager_engine_and_the_offline_loop():
    torch.backends.cuda.matmul.allow_tf32 = False
    speech = random_model(torch.float32)
    graphs, _ = run_engine(speech, GRAPHS)
    eager, _ = run_engine(speech, "eager")
    expected = [offline(speech, seed, v, frames) for seed, v, frames, _ in PLANS]
    assert eager == expected
    assert graphs == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_seeded_sampling_in_graphs_equals_the_padded_eager_step(dtype):
    speech = random_model(dtype)
    sampling = SamplingParams(temperature=0.8, top_k=40, seed=7)
    graphs, _ = run_engine(speech, GRAPHS, sampling)
    padded, _ = run_engine(speech, "padded", sampling)
    assert graphs == padded


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_codec_graph_chunks_equal_the_padded_eager_decode(dtype):
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    mimi = MimiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=16, num_filters=16, codebook_dim=64, vector_quantization_hidden_dimension=64, upsample_groups=64)
    with torch.device(DEVICE):
        codec = MimiModel(mimi).to(dtype).eval()
    config = random_model(dtype).config

    def decode(mode: str) -> dict:
        engine = CodecEngine(codec, config, max_streams=4, chunk_frames=2, decode_mode=mode)
        audio = {t: [] for t in range(3)}
        generator = torch.Generator().manual_seed(1)
        for tick in range(16):
            for turn in range(3):
                if tick == 2 * turn:
                    engine.open_stream(turn)
                if tick >= 2 * turn:
                    engine.push(turn, torch.randint(0, 2048, (1, 8), generator=generator))
            for turn, pcm in engine.step().items():
                audio[turn].append(pcm)
        return {t: torch.cat(chunks) for t, chunks in audio.items()}

    graphs, padded = decode(GRAPHS), decode("padded")
    for turn in graphs:
        assert torch.equal(graphs[turn], padded[turn]), turn


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_full_size_heads_capture_every_bucket_from_1_to_8(dtype):
    """Chroma-4B's head dims (decoder head_dim 128, where SDPA may pick another kernel): every bucket of batch 1 to 8
    is captured, each with the SDPA backend the stats name, and graph frames equal the padded eager step's."""
    speech = random_model(dtype, FULL_HEADS)
    graphs, stats = run_engine(speech, GRAPHS, plans=PLANS_8, slots=8)
    padded, _ = run_engine(speech, "padded", plans=PLANS_8, slots=8)
    print(f"{dtype}: SDPA backends of the captured buckets {stats.sdpa_backends}; voice prefill {stats.voice_prefill.sdpa_backends}")
    assert stats.eager_fallback_buckets == 0, stats
    assert stats.voice_prefill.eager_fallback_buckets == 0, stats.voice_prefill
    if DEVICE == "cuda":
        assert stats.cuda_graphs == 4 * 2 * 3  # batch 1, 2, 4, 8 x width 1, 3 x kv_len 64, 128, 256
    assert graphs == padded


def test_full_size_heads_in_every_mode_equal_the_offline_loop():
    """float32 at batch > 1 with CUDA's own (non-contiguous) SDPA outputs: eager, padded and graphs all give the
    offline loop's frames."""
    torch.backends.cuda.matmul.allow_tf32 = False
    speech = random_model(torch.float32, FULL_HEADS)
    expected = [offline(speech, seed, v, frames) for seed, v, frames, _ in PLANS]
    for mode in ("eager", "padded", GRAPHS):
        got, stats = run_engine(speech, mode)
        assert got == expected, mode


def test_compiled_graph_frames_equal_the_padded_eager_step():
    """torch.compile (inductor: fused norms, rotary, residual adds and sampling math), then one CUDA graph per bucket:
    float32 frames equal the padded eager step's. (gpu_check.sh runs this one in a stage of its own: compiling takes
    a while.)"""
    torch.backends.cuda.matmul.allow_tf32 = False
    speech = random_model(torch.float32)
    compiled, stats = run_engine(speech, COMPILED_GRAPHS)
    padded, _ = run_engine(speech, "padded")
    assert stats.eager_fallback_buckets == 0, stats
    assert compiled == padded
