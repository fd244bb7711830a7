"""Whole turns in one process: the caller's audio through `LocalTurnBackend` (the transformers Reasoner, the
SpeechEngine, the CodecLoop), time to first audio (TTFA) and RTF per concurrency. No vLLM, Ray or Redis: it runs on
a bare GPU machine (loadtest/gpu_check.sh) or here.

RANDOM weights, built in memory: `--size full` is Chroma-4B's sizes (the Qwen2.5-Omni-3B thinker with its audio
encoder, the Backbone, the Decoder and Mimi), `--size tiny` the project's tiny checkpoint's. The tokenizer is the
tiny checkpoint's (the thinker only ever sees its ids); the random thinker rarely ends its text, so turns run to
`--frames`.

    python loadtest/bench_turn.py [--size full|tiny] [--device cuda] [--dtype bfloat16] [--concurrency 1,8]
        [--frames 50] [--step-mode auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.pipeline.local import LocalTurnBackend  # noqa: E402
from cluster.settings.turns import TurnSettings  # noqa: E402
from cluster.state.store import Voice  # noqa: E402
from loadtest.turn_timing import engine_turn, measure, summary  # noqa: E402
from model.chroma.checkpoint import resolve_dtype  # noqa: E402
from model.chroma.config import BACKBONE_DEFAULTS, DECODER_DEFAULTS, ChromaConfig  # noqa: E402
from model.engines.codec import CodecEngine  # noqa: E402
from model.engines.codec_loop import CodecLoop  # noqa: E402
from model.engines.speech import SpeechEngine  # noqa: E402
from model.processing.processor import ChromaProcessor  # noqa: E402
from model.reasoner.hf import HFReasoner  # noqa: E402
from model.settings import SpeechEngineSettings  # noqa: E402
from model.testing.processor_files import remapped_special_token_ids, write_processor_files  # noqa: E402
from model.testing.random_speech import random_speech  # noqa: E402
from model.testing.speech import synthetic_speech  # noqa: E402
from model.testing.tiny import SPECIAL_BASE, TEXT_VOCAB, tiny_config  # noqa: E402

VOICE_TEXT = "This is the voice you will hear in every reply."


def full_size_config() -> dict:
    """The tiny checkpoint's config (its special ids and tokenizer) at Chroma-4B's sizes."""
    config = tiny_config()
    thinker = config["thinker_config"]
    thinker["text_config"].update(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "type": "mrope", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    thinker["audio_config"].update(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, output_dim=2048)
    thinker["vision_config"]["out_hidden_size"] = 2048  # the vision tower is never run; it only must fit the text width
    for part, defaults in (("backbone_config", BACKBONE_DEFAULTS), ("decoder_config", DECODER_DEFAULTS)):
        config[part].update(defaults)
    from transformers import MimiConfig

    config["codec_config"] = {**MimiConfig().to_dict(), "model_type": "mimi", "use_cache": False, "use_streaming": False}
    return config


def build_backend(args, workdir: Path) -> LocalTurnBackend:
    from transformers import MimiModel, Qwen2_5OmniThinkerForConditionalGeneration

    raw = full_size_config() if args.size == "full" else tiny_config()
    config = ChromaConfig.model_validate(raw)
    write_processor_files(workdir, remapped_special_token_ids(SPECIAL_BASE), TEXT_VOCAB)
    (workdir / "config.json").write_text(json.dumps(raw))
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    with torch.device(args.device):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config.thinker_hf_config(), dtype=dtype).eval()
        codec = MimiModel(config.codec_hf_config()).to(dtype).eval()
    speech = random_speech(config, args.device, dtype)
    slots = max(args.concurrency)
    engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=slots, max_frames=args.frames, step_mode=args.step_mode))
    codec_mode = "auto" if args.step_mode in ("auto", "eager") else ("padded" if args.step_mode == "padded" else "cuda_graphs")
    codec_loop = CodecLoop(CodecEngine(codec, config, max_streams=slots, decode_mode=codec_mode))
    return LocalTurnBackend(HFReasoner(thinker, ChromaProcessor.from_pretrained(workdir)), engine, codec_loop,
                            TurnSettings(max_frames=args.frames))


async def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        backend = build_backend(args, Path(tmp))
        setup_s = time.perf_counter() - started
        try:
            prompt = await backend.clone_voice(VOICE_TEXT, synthetic_speech(24000, 2.0, seed=2), 24000)
            voice = Voice.new("bench", "bench", VOICE_TEXT, prompt.transcript_ids.tolist(), prompt.codes.numpy(), prompt.valid_frames)
            caller = synthetic_speech(16000, args.caller_seconds, seed=1)
            await engine_turn(backend, voice, caller)  # warm-up: the voice is cached from here on
            levels = {}
            for concurrency in args.concurrency:
                levels[concurrency] = summary(await measure(lambda: engine_turn(backend, voice, caller), concurrency, args.rounds))
                print(f"concurrency {concurrency}: " + ", ".join(f"{k} {v:.3g}" for k, v in levels[concurrency].items()), flush=True)
            stats = backend.stats()
        finally:
            await backend.close()
    return {"size": args.size, "device": args.device, "setup_s": setup_s, "levels": levels,
            "speech": {k: getattr(stats.speech, k) for k in ("step_mode", "cuda_graphs", "eager_fallback_buckets", "graph_capture_s")},
            "codec": {k: getattr(stats.codec, k) for k in ("decode_mode", "cuda_graphs", "eager_fallback_buckets")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--rounds", type=int, default=1, help="rounds of simultaneous turns per concurrency")
    parser.add_argument("--frames", type=int, default=50, help="frame limit per reply")
    parser.add_argument("--caller-seconds", type=float, default=2.0)
    parser.add_argument("--step-mode", default="auto", help="the SpeechEngine's step mode (the codec follows it)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    print(f"RANDOM WEIGHTS, size {args.size}, {args.device}: timings only", flush=True)
    result = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
