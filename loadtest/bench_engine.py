"""Speech-engine benchmark: continuous batching at several concurrencies vs the offline loop.

Turns join at staggered times and are fed synthetic thinker pairs (token, hidden state) as fast as they are
asked for, so the figures are the speech stack's own. Weights are RANDOM: the tiny checkpoint (CPU default) or
`--size full`, the real Chroma-4B backbone/decoder/Mimi dimensions built in memory (meant for a GPU).
`--codec` also streams every turn's frames through the CodecEngine (2-frame chunks) and reports the time to
the first audio chunk.

    python loadtest/bench_engine.py [--size tiny|full] [--concurrency 1,2,4,8,16] [--frames 100] [--codec] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.engines.codec import CodecEngine  # noqa: E402
from model.chroma.config import ChromaConfig  # noqa: E402
from model.chroma.turn import VoicePrompt  # noqa: E402
from model.offline import speak_turn  # noqa: E402
from model.chroma.speech import SpeechModel  # noqa: E402
from model.engines.speech import SpeechEngine, SpeechEngineSettings  # noqa: E402

FRAME_SECONDS = 0.08


def build_speech(size: str, device: str, dtype: torch.dtype) -> SpeechModel:
    if size == "tiny":
        from model.testing.tiny import ensure_tiny_checkpoint
        from model.chroma.checkpoint import load_component

        return load_component(ensure_tiny_checkpoint(), "speech", dtype=dtype, device=device)
    config = ChromaConfig.model_validate({
        "thinker_config": {"text_config": {"hidden_size": 2048, "vocab_size": 151936}},
        "backbone_config": {}, "decoder_config": {}, "codec_config": {"codebook_size": 2048, "sampling_rate": 24000},
    })
    with torch.device(device):
        speech = SpeechModel(config).to(dtype)
    for name, param in speech.named_parameters():  # O(1) activations, like trained weights
        if param.ndim >= 2:
            torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    speech.tie_weights()
    return speech.eval()


def build_codec(size: str, device: str, dtype: torch.dtype):
    from transformers import MimiConfig, MimiModel

    if size == "tiny":
        from model.testing.tiny import DEFAULT_TINY_DIR
        from model.chroma.checkpoint import load_component

        return load_component(DEFAULT_TINY_DIR, "codec", dtype=dtype, device=device)
    with torch.device(device):
        return MimiModel(MimiConfig()).to(dtype).eval()


def random_voice(speech: SpeechModel, seed: int) -> VoicePrompt:
    generator = torch.Generator().manual_seed(seed)
    return VoicePrompt(
        transcript_ids=torch.randint(0, 4000, (24,), generator=generator),
        codes=torch.randint(1, 2048, (40, 8), generator=generator),  # a 3.2 s reference clip
        valid_frames=40,
    )


def synthetic_pairs(speech: SpeechModel, seed: int, text_tokens: int):
    """(token, hidden) pairs standing in for the Reasoner: `text_tokens` tokens, the last one im_end."""
    generator = torch.Generator().manual_seed(seed)
    hidden_size = speech.config.backbone_config.hidden_size
    pairs = [(int(torch.randint(0, 4000, (1,), generator=generator)), torch.randn(hidden_size, generator=generator))
             for _ in range(text_tokens - 1)]
    pairs.append((speech.config.im_end_token_id, torch.randn(hidden_size, generator=generator)))
    return [(token, hidden.to(speech.device, speech.dtype)) for token, hidden in pairs]


async def as_stream(pairs):
    for pair in pairs:
        yield pair


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate_turn_frames_per_s(frames: int) -> float:
    """The offline `generate_turn` end to end (thinker, speech loop, one-shot codec) on the tiny checkpoint."""
    from model.testing.tiny import DEFAULT_TINY_DIR
    from model.offline import OfflineChroma
    from model.processing.processor import Conversation, Message
    from model.testing.speech import synthetic_speech

    chroma = OfflineChroma(DEFAULT_TINY_DIR)
    voice = chroma.voice("This is the voice you will hear.", synthetic_speech(24000, 3.2), 24000)
    conversation = Conversation("You are a helpful voice assistant.", [Message("user", audio=synthetic_speech(16000, 2.0, 1), sample_rate=16000)])
    chroma.reply(conversation, voice, max_frames=4)  # warm-up
    result = chroma.reply(conversation, voice, max_frames=frames)
    return result.frames.shape[0] / result.timings["total_s"]


def offline_speech_frames_per_s(speech: SpeechModel, frames: int, text_tokens: int, device: str) -> float:
    """generate_turn's speech loop alone, fed the same synthetic thinker pairs as the engine."""
    voice, pairs = random_voice(speech, 0), iter(synthetic_pairs(speech, 0, text_tokens))
    speak_turn(speech, voice, lambda _: next(pairs), 4)  # warm-up
    pairs = iter(synthetic_pairs(speech, 0, text_tokens))
    sync(device)
    started = time.perf_counter()
    progress = speak_turn(speech, voice, lambda _: next(pairs), frames)
    sync(device)
    return len(progress.frames) / (time.perf_counter() - started)


async def run_level(speech: SpeechModel, codec, concurrency: int, frames: int, text_tokens: int, stagger_s: float, device: str) -> dict:
    engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=max(concurrency, 1), max_frames=frames))
    codec_engine = CodecEngine(codec, speech.config, max_streams=concurrency) if codec is not None else None
    first_audio: dict[str, float] = {}
    voices = [random_voice(speech, seed) for seed in range(4)]

    async def decode_audio(done: asyncio.Event):
        # The codec engine has one owner: this task, on the event loop thread.
        while not done.is_set():
            for turn_id in codec_engine.step():
                first_audio.setdefault(turn_id, time.perf_counter())
            await asyncio.sleep(0.002)

    async def one(index: int):
        await asyncio.sleep(index * stagger_s)
        turn_id = f"turn-{index}-{time.perf_counter()}"
        submitted = time.perf_counter()
        first, count = None, 0
        if codec_engine:
            codec_engine.open_stream(turn_id)
        stream = await engine.submit(turn_id, voices[index % len(voices)],
                                     as_stream(synthetic_pairs(speech, index, text_tokens)), max_frames=frames)
        async for frame in stream:
            if frame.codes is not None:
                count += 1
                first = first or time.perf_counter()
                if codec_engine:
                    codec_engine.push(turn_id, torch.tensor([frame.codes]))
        if codec_engine:
            codec_engine.close(turn_id)
        ended = time.perf_counter()
        record = {"first_frame_ms": 1000 * (first - submitted), "rtf": (ended - submitted) / (count * FRAME_SECONDS), "frames": count}
        if turn_id in first_audio:
            record["first_audio_ms"] = 1000 * (first_audio[turn_id] - submitted)
        return record

    async def level(count: int):
        done = asyncio.Event()
        decoder = asyncio.create_task(decode_audio(done)) if codec_engine else None
        turns = await asyncio.gather(*(one(i) for i in range(count)))
        done.set()
        if decoder:
            await decoder
        return turns

    await level(min(concurrency, len(voices)))  # warm-up: fills the voice cache and, on a GPU, the allocator
    engine.step_times.clear()
    reset_peak_memory(device)
    started = time.perf_counter()
    turns = await level(concurrency)
    wall = time.perf_counter() - started
    stats = engine.stats()
    await engine.close()
    rtfs = [t["rtf"] for t in turns]
    return {
        "concurrency": concurrency,
        "frames_per_s": sum(t["frames"] for t in turns) / wall,
        "rtf_p50": statistics.median(rtfs),
        "rtf_max": max(rtfs),
        "first_frame_ms_p50": statistics.median(t["first_frame_ms"] for t in turns),
        "step_ms_p50": stats["step_ms_p50"],
        "step_ms_p95": stats["step_ms_p95"],
        "peak_mem_mb": peak_memory_mb(device),
        **({"first_audio_ms_p50": statistics.median(t["first_audio_ms"] for t in turns if "first_audio_ms" in t)} if codec else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--frames", type=int, default=100, help="frames per turn (12.5 per second of audio)")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--stagger-ms", type=float, default=40.0, help="delay between turns joining")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--codec", action="store_true", help="also stream-decode every turn with the CodecEngine")
    parser.add_argument("--json", help="also write the figures as JSON records to this path")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    speech = build_speech(args.size, args.device, dtype)
    codec = build_codec(args.size, args.device, dtype) if args.codec else None
    print(f"RANDOM WEIGHTS, size {args.size}, {args.device} {dtype}, {args.frames} frames per turn, "
          f"threads {torch.get_num_threads()}")
    offline = offline_speech_frames_per_s(speech, args.frames, args.text_tokens, args.device)
    print(f"offline speech loop (speak_turn, synthetic thinker pairs) at concurrency 1: {offline:.1f} frames/s")
    # generate_turn needs a thinker: the full-size bench has none, so its baseline is the speech loop.
    baseline = generate_turn_frames_per_s(args.frames) if args.size == "tiny" else offline
    if args.size == "tiny":
        print(f"baseline: generate_turn end to end (thinker + speech + codec) at concurrency 1: {baseline:.1f} frames/s")

    header = f"{'conc':>4} {'frames/s':>9} {'x1':>6} {'rtf p50':>8} {'rtf max':>8} {'1st frame ms':>13} {'step p50':>9} {'step p95':>9} {'peak MB':>8}"
    header += f" {'1st audio ms':>13}" if codec is not None else ""
    print(header)
    records = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        record = asyncio.run(run_level(speech, codec, concurrency, args.frames, args.text_tokens, args.stagger_ms / 1000, args.device))
        record["baseline_frames_per_s"] = baseline
        record["offline_speech_frames_per_s"] = offline
        records.append(record)
        print(f"{concurrency:>4} {record['frames_per_s']:>9.1f} {record['frames_per_s'] / records[0]['frames_per_s']:>6.2f} "
              f"{record['rtf_p50']:>8.3f} {record['rtf_max']:>8.3f} {record['first_frame_ms_p50']:>13.1f} "
              f"{record['step_ms_p50']:>9.1f} {record['step_ms_p95']:>9.1f} {record['peak_mem_mb']:>8.0f}"
              + (f" {record['first_audio_ms_p50']:>13.1f}" if codec is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
