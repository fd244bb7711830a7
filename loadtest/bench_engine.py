"""Speech-engine benchmark: continuous batching at several concurrencies, next to the offline loops.

Turns join at staggered times and are fed synthetic Reasoner pairs (token, hidden state on the host, as the Reasoner
deployment sends them) as fast as they are asked for, so the figures are the speech stack's own. The model is a
checkpoint (`--checkpoint DIR`, any checkpoint in the official layout, Chroma-4B included) or RANDOM weights:
`--size tiny` (the project's tiny checkpoint) or `--size full` (the real Chroma-4B Backbone/Decoder/Mimi dimensions
built in memory, meant for a GPU). `--codec` also streams every turn's frames through the CodecEngine (2-frame
chunks) and reports the time to the first audio chunk.

Offline baselines, each one turn at a time on the same synthetic pairs: an upstream-style speech loop (the Backbone
and Decoder as transformers `LlamaModel`s with a `DynamicCache`, the decoder stepped token by token with a fresh
cache per frame, as upstream's per-frame `generate()` does), our `speak_turn` (generate_turn's speech loop), and,
for a checkpoint with a thinker, `generate_turn` end to end (thinker + speech + one-shot codec decode).

    python loadtest/bench_engine.py [--checkpoint DIR | --size tiny|full] [--device cuda] [--dtype bfloat16]
        [--step-modes eager,cuda_graphs] [--concurrency 1,8,32] [--frames 100] [--codec] [--json PATH]
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

from model.chroma.checkpoint import Checkpoint, load_codec, load_speech, load_thinker, resolve_dtype  # noqa: E402
from model.chroma.config import ChromaConfig  # noqa: E402
from model.chroma.speech import SpeechModel  # noqa: E402
from model.chroma.turn import VoicePrompt  # noqa: E402
from model.engines.codec import CodecEngine  # noqa: E402
from model.engines.speech import SpeechEngine, SpeechEngineSettings  # noqa: E402
from model.offline import speak_turn  # noqa: E402

FRAME_SECONDS = 0.08
RTF_TARGET = 0.5  # per-turn RTF the capacity figure asks for (the Reasoner's share of the GPU set aside)


def full_size_config() -> ChromaConfig:
    return ChromaConfig.model_validate({
        "thinker_config": {"text_config": {"hidden_size": 2048, "vocab_size": 151936}},
        "backbone_config": {}, "decoder_config": {}, "codec_config": {"codebook_size": 2048, "sampling_rate": 24000},
    })


def build_speech(args, dtype: torch.dtype) -> SpeechModel:
    if (directory := model_dir(args)) is not None:
        return load_speech(Checkpoint(directory), dtype, args.device)
    with torch.device(args.device):
        speech = SpeechModel(full_size_config()).to(dtype)
    for param in speech.parameters():  # O(1) activations, like trained weights
        if param.ndim >= 2:
            torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    speech.tie_weights()
    return speech.eval()


def build_codec(args, dtype: torch.dtype):
    if (directory := model_dir(args)) is not None:
        return load_codec(Checkpoint(directory), dtype, args.device)
    from transformers import MimiConfig, MimiModel

    with torch.device(args.device):
        return MimiModel(MimiConfig()).to(dtype).eval()


def model_dir(args) -> Path | None:
    """The checkpoint the models load from; None for `--size full` (random full-size weights, made in memory)."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.size != "tiny":
        return None
    from model.testing.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


def random_voice(seed: int) -> VoicePrompt:
    generator = torch.Generator().manual_seed(seed)
    return VoicePrompt(
        transcript_ids=torch.randint(0, 4000, (24,), generator=generator),
        codes=torch.randint(1, 2048, (40, 8), generator=generator),  # 40 frames: a 3.2 s reference clip
        valid_frames=40,
    )


def synthetic_pairs(speech: SpeechModel, seed: int, text_tokens: int):
    """(token, hidden) pairs standing in for the Reasoner: `text_tokens` tokens, the last one im_end; hidden states
    float32 on the host, as the Reasoner sends them."""
    generator = torch.Generator().manual_seed(seed)
    hidden_size = speech.config.backbone_config.hidden_size
    vocab = min(4000, speech.config.thinker_config["text_config"]["vocab_size"])
    pairs = [(int(torch.randint(0, vocab, (1,), generator=generator)), torch.randn(hidden_size, generator=generator))
             for _ in range(text_tokens - 1)]
    pairs.append((speech.config.im_end_token_id, torch.randn(hidden_size, generator=generator)))
    return pairs


async def as_stream(pairs):
    for pair in pairs:
        yield pair


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    """Peak device memory allocated since the last reset on CUDA; the process's peak RSS on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- offline baselines ---------------------------------------------------------------------------------------

class Clock:
    """Wall and process CPU seconds of a region. On a shared machine the CPU figure (frames per CPU-second, all
    threads together) moves less with other load than the wall one."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, frames: int) -> dict:
        return {"frames_per_s": frames / self.wall, "frames_per_cpu_s": frames / self.cpu}


def speak_turn_rates(speech: SpeechModel, frames: int, text_tokens: int, device: str) -> tuple[dict, list]:
    """generate_turn's speech loop alone, fed the synthetic pairs -> (rates, the frames)."""
    voice = random_voice(0)
    pairs = iter(synthetic_pairs(speech, 0, text_tokens))
    speak_turn(speech, voice, lambda _: next(pairs), 4)  # warm-up
    pairs = iter(synthetic_pairs(speech, 0, text_tokens))
    with Clock(device) as clock:
        progress = speak_turn(speech, voice, lambda _: next(pairs), frames)
    return clock.rates(len(progress.frames)), progress.frames


def upstream_style_rates(speech: SpeechModel, frames: int, text_tokens: int, device: str) -> tuple[dict, list]:
    """The reference's structure on transformers: Backbone and Decoder as `LlamaModel`s (our weights) with a
    `DynamicCache`; per frame a fresh decoder cache stepped one codebook at a time. Greedy -> (rates, frames)."""
    from transformers import DynamicCache

    backbone, decoder = hf_llama(speech.backbone.model), hf_llama(speech.decoder.model)
    config = speech.config
    eos, codebooks = config.codebook_eos_token_id, config.audio_num_codebooks

    def greedy(logits):
        logits = logits.float()
        logits[..., config.codec_codebook_size:] = float("-inf")
        return logits.argmax(-1)

    @torch.inference_mode()
    def run(count: int) -> list[list[int]]:
        voice, pairs = random_voice(0), iter(synthetic_pairs(speech, 0, text_tokens))
        token, hidden = next(pairs)
        embeds = torch.cat([speech.voice_prompt_embeddings(voice.transcript_ids, voice.codes), speech.reasoner_pair(token, hidden)])
        cache, length, out, reasoner_done = DynamicCache(), 0, [], token == config.im_end_token_id
        while len(out) < count:
            positions = torch.arange(length, length + embeds.shape[0], device=speech.device)[None]
            x = backbone(inputs_embeds=embeds[None], past_key_values=cache, position_ids=positions, use_cache=True).last_hidden_state[:, -1]
            length += embeds.shape[0]
            code = greedy(speech.backbone.codebook0_head(x))
            frame, inputs, frame_cache = [code], torch.stack([x, speech.decoder.audio_embedding.codebook(code, 0)], 1), DynamicCache()
            for k in range(1, codebooks):  # upstream's decoder positions: 0, 0 for the first two inputs, then k - 1
                position = torch.full((1, inputs.shape[1]), max(k - 1, 0), device=speech.device)
                h = decoder(inputs_embeds=speech.decoder.projection(inputs), past_key_values=frame_cache, position_ids=position, use_cache=True).last_hidden_state[:, -1]
                code = greedy(h @ speech.decoder.codebook_head.weight[k - 1])
                frame.append(code)
                inputs = speech.decoder.audio_embedding.codebook(code, k)[:, None]
            codes = torch.stack(frame, 1)
            out.append(codes[0].tolist())
            if all(c == eos for c in out[-1][: codebooks - 1]):
                break
            embeds = speech.frame_embeddings(codes)
            if len(out) % 2 == 0 and not reasoner_done:
                token, hidden = next(pairs)
                reasoner_done = token == config.im_end_token_id
                embeds = torch.cat([embeds, speech.reasoner_pair(token, hidden)])
        return out

    run(4)  # warm-up
    with Clock(device) as clock:
        out = run(frames)
    return clock.rates(len(out)), out


def hf_llama(stack):
    """A transformers LlamaModel holding the weights of one of our stacks."""
    from transformers import LlamaConfig, LlamaModel

    cfg = stack.config
    hf = LlamaModel(LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=cfg.rope_parameters,
        vocab_size=8, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, hidden_act=cfg.hidden_act,
    ))
    hf.load_state_dict(stack.state_dict(), strict=False)  # its 8-row token embedding stays unused
    return hf.to(stack.norm.weight.device, stack.norm.weight.dtype).eval()


def generate_turn_rates(args, speech: SpeechModel, codec, dtype: torch.dtype, frames: int) -> dict | None:
    """`generate_turn` end to end (thinker prefill and steps, speech loop, one-shot codec decode) on a text-only
    conversation of random token ids, with the models already built (`codec` None: loaded here); None for
    `--size full` (no thinker)."""
    if (directory := model_dir(args)) is None:
        return None
    from model.chroma.codec import encode_voice
    from model.offline import generate_turn
    from model.processing.processor import ReasonerInputs

    checkpoint = Checkpoint(directory)
    thinker = load_thinker(checkpoint, dtype, args.device)
    codec = codec if codec is not None else load_codec(checkpoint, dtype, args.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4000, (1, 36), generator=generator)
    conversation = ReasonerInputs(input_ids=ids, attention_mask=torch.ones_like(ids))
    audio = 0.1 * torch.randn(1, 1, 40 * checkpoint.config.audio_frame_freq, generator=generator)
    voice = encode_voice(codec, checkpoint.config, ids[0, :12], audio.to(args.device, dtype))
    generate_turn(thinker, speech, codec, conversation, voice, max_frames=4)  # warm-up
    with Clock(args.device) as clock:
        result = generate_turn(thinker, speech, codec, conversation, voice, max_frames=frames)
    return clock.rates(result.frames.shape[0])


# ---- the engine --------------------------------------------------------------------------------------------------

async def run_level(speech: SpeechModel, codec, args, step_mode: str, concurrency: int) -> dict:
    started = time.perf_counter()
    engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=max(concurrency, 1), max_frames=args.frames, step_mode=step_mode))
    codec_engine = (CodecEngine(codec, speech.config, max_streams=concurrency, decode_mode=args.codec_mode)
                    if codec is not None else None)
    setup_s = time.perf_counter() - started
    first_audio: dict[str, float] = {}
    voices = [random_voice(seed) for seed in range(4)]

    async def decode_audio(done: asyncio.Event):
        # The codec engine has one owner: this task, on the event loop thread.
        while not done.is_set():
            for turn_id in codec_engine.step():
                first_audio.setdefault(turn_id, time.perf_counter())
            await asyncio.sleep(0.002)

    async def one(index: int):
        await asyncio.sleep(index * args.stagger_ms / 1000)
        turn_id = f"turn-{index}-{time.perf_counter()}"
        submitted = time.perf_counter()
        first, count = None, 0
        if codec_engine:
            codec_engine.open_stream(turn_id)
        stream = await engine.submit(turn_id, voices[index % len(voices)],
                                     as_stream(synthetic_pairs(speech, index, args.text_tokens)), max_frames=args.frames)
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
    sync(args.device)
    reset_peak_memory(args.device)
    with Clock(args.device) as clock:
        turns = await level(concurrency)
    stats = engine.stats()
    await engine.close()
    rtfs = [t["rtf"] for t in turns]
    record = {
        "step_mode": stats["step_mode"],
        "concurrency": concurrency,
        **clock.rates(sum(t["frames"] for t in turns)),
        "rtf_p50": statistics.median(rtfs),
        "rtf_max": max(rtfs),
        "first_frame_ms_p50": statistics.median(t["first_frame_ms"] for t in turns),
        "first_frame_ms_max": max(t["first_frame_ms"] for t in turns),
        "step_ms_p50": stats["step_ms_p50"],
        "step_ms_p95": stats["step_ms_p95"],
        "peak_mem_mb": peak_memory_mb(args.device),
        "cuda_graphs": stats["cuda_graphs"],
        "graph_capture_s": stats["graph_capture_s"],
        "engine_setup_s": setup_s,
    }
    if codec_engine:
        record["first_audio_ms_p50"] = statistics.median(t["first_audio_ms"] for t in turns if "first_audio_ms" in t)
        record["codec_mode"] = codec_engine.decode_mode
    return record


def capacity(records: list[dict], step_mode: str) -> int | None:
    """The highest concurrency whose every turn ran at RTF <= RTF_TARGET."""
    fitting = [r["concurrency"] for r in records if r["step_mode"] == step_mode and r["rtf_max"] <= RTF_TARGET]
    return max(fitting) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint directory in the official layout (default: --size)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="RANDOM weights when no --checkpoint")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--frames", type=int, default=100, help="frames per turn (12.5 per second of audio)")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--stagger-ms", type=float, default=40.0, help="delay between turns joining")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--step-modes", default="auto", help="SpeechEngine step modes to compare, e.g. eager,cuda_graphs")
    parser.add_argument("--codec-mode", default="auto", help="CodecEngine decode mode with --codec")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--codec", action="store_true", help="also stream-decode every turn with the CodecEngine")
    parser.add_argument("--baselines", default="upstream,speak_turn,generate_turn",
                        help="offline baselines to run first (comma-separated; empty for none)")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    speech = build_speech(args, dtype)
    codec = build_codec(args, dtype) if args.codec else None
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"RANDOM WEIGHTS, size {args.size}"
    print(f"{weights}, {args.device} {dtype}, {args.frames} frames per turn, threads {torch.get_num_threads()}")

    baselines = {}
    wanted = [b for b in args.baselines.split(",") if b]
    if "upstream" in wanted:
        baselines["upstream_style"], upstream_frames = upstream_style_rates(speech, args.frames, args.text_tokens, args.device)
    if "speak_turn" in wanted:
        baselines["speak_turn"], ours = speak_turn_rates(speech, args.frames, args.text_tokens, args.device)
        if "upstream" in wanted:
            baselines["upstream_style_frames_equal_speak_turn"] = upstream_frames == ours
    if "generate_turn" in wanted:
        baselines["generate_turn"] = generate_turn_rates(args, speech, codec, dtype, args.frames)
    for name, value in baselines.items():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in value.items()) if isinstance(value, dict) else value
        print(f"baseline {name}: {shown}")

    header = (f"{'mode':>11} {'conc':>4} {'frames/s':>9} {'/cpu s':>7} {'rtf p50':>8} {'rtf max':>8} {'1st frame ms':>13} "
              f"{'step p50':>9} {'step p95':>9} {'peak MB':>8}" + (f" {'1st audio ms':>13}" if codec is not None else ""))
    print(header)
    records = []
    for step_mode in args.step_modes.split(","):
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            record = asyncio.run(run_level(speech, codec, args, step_mode, concurrency))
            records.append(record)
            print(f"{record['step_mode']:>11} {concurrency:>4} {record['frames_per_s']:>9.1f} {record['frames_per_cpu_s']:>7.1f} {record['rtf_p50']:>8.3f} "
                  f"{record['rtf_max']:>8.3f} {record['first_frame_ms_p50']:>13.1f} {record['step_ms_p50']:>9.2f} "
                  f"{record['step_ms_p95']:>9.2f} {record['peak_mem_mb']:>8.0f}"
                  + (f" {record['first_audio_ms_p50']:>13.1f}" if codec is not None else ""), flush=True)
    modes = sorted({r["step_mode"] for r in records})
    capacities = {mode: capacity(records, mode) for mode in modes}
    for mode, value in capacities.items():
        print(f"{mode}: highest concurrency with per-turn RTF max <= {RTF_TARGET}: {value}")
    if args.json:
        summary = {
            "weights": weights, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "frames_per_turn": args.frames,
            "text_tokens": args.text_tokens, "codec": args.codec, "baselines": baselines, "levels": records,
            f"capacity_at_rtf_{RTF_TARGET}": capacities,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        }
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
