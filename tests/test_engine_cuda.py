"""CUDA only (skipped without a GPU; `loadtest/gpu_check.sh` runs it there): the CUDA-graph speech engine and codec
replay exactly what their padded eager step computes, in float32 and bfloat16, and in float32 they equal the eager
engine and the offline loop. RANDOM weights: a mid-size speech model built in memory, the tiny Mimi.

Needs only torch, transformers and pydantic (no Ray, vLLM, Redis or audio libraries): it runs with --noconftest.
"""

import asyncio

import pytest
import torch

from model.chroma.config import ChromaConfig
from model.chroma.sampling import SamplingParams
from model.chroma.speech import SpeechModel
from model.chroma.turn import VoicePrompt
from model.engines.codec import CodecEngine
from model.engines.speech import SpeechEngine, SpeechEngineSettings
from model.offline import speak_turn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.bfloat16]


def random_speech(dtype: torch.dtype) -> SpeechModel:
    """Real Chroma-4B head layout (GQA 4:1 in the backbone), smaller widths; RANDOM weights, O(1) activations."""
    config = ChromaConfig.model_validate({
        "thinker_config": {"text_config": {"hidden_size": 512, "vocab_size": 4096}},
        "backbone_config": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
                            "num_key_value_heads": 2, "head_dim": 64},
        "decoder_config": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "head_dim": 64, "audio_embedding_dim": 512},
        "codec_config": {"codebook_size": 2048, "sampling_rate": 24000},
        "im_end_token_id": 4045, "text_start_token_id": 4065, "text_end_token_id": 4066,
    })
    torch.manual_seed(0)
    with torch.device("cuda"):
        speech = SpeechModel(config).to(dtype)
    for param in speech.parameters():
        if param.ndim >= 2:
            torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    speech.tie_weights()
    return speech.eval()


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


def run_engine(speech: SpeechModel, mode: str, sampling: SamplingParams | None = None) -> tuple[list, dict]:
    async def main():
        engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=4, step_mode=mode))
        tasks = []
        for seed, v, frames, delay in PLANS:
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
    speech = random_speech(dtype)
    graphs, stats = run_engine(speech, "cuda_graphs")
    padded, _ = run_engine(speech, "padded")
    assert stats["step_mode"] == "cuda_graphs" and stats["cuda_graphs"] > 0
    assert graphs == padded


def test_float32_graph_frames_equal_the_eager_engine_and_the_offline_loop():
    torch.backends.cuda.matmul.allow_tf32 = False
    speech = random_speech(torch.float32)
    graphs, _ = run_engine(speech, "cuda_graphs")
    eager, _ = run_engine(speech, "eager")
    expected = [offline(speech, seed, v, frames) for seed, v, frames, _ in PLANS]
    assert eager == expected
    assert graphs == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_seeded_sampling_in_graphs_equals_the_padded_eager_step(dtype):
    speech = random_speech(dtype)
    sampling = SamplingParams(temperature=0.8, top_k=40, seed=7)
    graphs, _ = run_engine(speech, "cuda_graphs", sampling)
    padded, _ = run_engine(speech, "padded", sampling)
    assert graphs == padded


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_codec_graph_chunks_equal_the_padded_eager_decode(dtype):
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    mimi = MimiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=16, num_filters=16, codebook_dim=64, vector_quantization_hidden_dimension=64, upsample_groups=64)
    with torch.device("cuda"):
        codec = MimiModel(mimi).to(dtype).eval()
    config = random_speech(dtype).config

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

    graphs, padded = decode("cuda_graphs"), decode("padded")
    for turn in graphs:
        assert torch.equal(graphs[turn], padded[turn]), turn
