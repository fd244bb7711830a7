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

Per step mode, one SpeechEngine (and CodecEngine) sized for the largest level serves every level, as a server would:
its buckets are settled (on CUDA: SDPA backend chosen, graphs captured) once, and the mode's line says how many
graphs, how many buckets run padded eager instead, the capture seconds, the graph pool's memory and which SDPA
backend each bucket (batch x width x kv_len) runs. Then one line per level, and the kernels per step from
torch.profiler at batch 1 and at the largest level (on CUDA the GPU kernels and the host's launches, a graph replay
being one launch; on a CPU the operators dispatched). A mode or level that fails is recorded with its error in the
JSON and the sweep goes on; the exit status is then 1.

    python loadtest/bench_engine.py [--checkpoint DIR | --size tiny|full] [--device cuda] [--dtype bfloat16]
        [--step-modes padded,cuda_graphs] [--concurrency 1,8,32] [--frames 100] [--codec] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.chroma.checkpoint import Checkpoint, load_codec, load_speech, load_thinker, resolve_dtype  # noqa: E402
from model.chroma.speech import SpeechModel  # noqa: E402
from model.chroma.turn import VoicePrompt  # noqa: E402
from model.engines.codec import CodecEngine  # noqa: E402
from model.engines.speech import SpeechEngine  # noqa: E402
from model.offline import speak_turn  # noqa: E402
from model.settings import SpeechEngineSettings  # noqa: E402
from model.testing.random_speech import random_speech, speech_config  # noqa: E402

FRAME_SECONDS = 0.08
RTF_TARGET = 0.5  # per-turn RTF the capacity figure asks for (the Reasoner's share of the GPU set aside)


def build_speech(args, dtype: torch.dtype) -> SpeechModel:
    if (directory := model_dir(args)) is not None:
        return load_speech(Checkpoint(directory), dtype, args.device)
    return random_speech(speech_config(text_vocab=151936), args.device, dtype)  # Chroma-4B's Backbone and Decoder


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

def codec_mode_for(args, step_mode: str) -> str:
    """The codec's decode mode: --codec-mode, or by default the speech step's (graphs where the step has graphs)."""
    if args.codec_mode != "same":
        return args.codec_mode
    return {"compiled_graphs": "cuda_graphs", "compiled": "padded"}.get(step_mode, step_mode)


def build_engines(speech: SpeechModel, codec, args, step_mode: str) -> tuple[SpeechEngine, CodecEngine | None, dict]:
    """One SpeechEngine (and CodecEngine) per step mode, sized for the largest level: buckets are settled (graphs
    captured) once, as in a server, and every level runs on them."""
    slots = max(args.concurrency)
    started = time.perf_counter()
    settings = SpeechEngineSettings(max_slots=slots, max_frames=args.frames, step_mode=step_mode,
                                    compile_backend=args.compile_backend, cpu_threads=args.cpu_threads)
    engine = SpeechEngine(speech, settings)
    speech_s = time.perf_counter() - started
    codec_engine = None
    if codec is not None:
        codec_engine = CodecEngine(codec, speech.config, max_streams=slots, decode_mode=codec_mode_for(args, step_mode),
                                   compile_backend=args.compile_backend)
    return engine, codec_engine, {"speech_setup_s": speech_s, "codec_setup_s": time.perf_counter() - started - speech_s}


async def run_level(engine: SpeechEngine, codec_engine: CodecEngine | None, args, concurrency: int) -> dict:
    speech = engine.speech
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
        try:
            stream = await engine.submit(turn_id, voices[index % len(voices)],
                                         as_stream(synthetic_pairs(speech, index, args.text_tokens)), max_frames=args.frames)
            async for frame in stream:
                if frame.codes is not None:
                    count += 1
                    first = first or time.perf_counter()
                    if codec_engine:
                        codec_engine.push(turn_id, torch.tensor([frame.codes]))
        finally:
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
        try:
            return await asyncio.gather(*(one(i) for i in range(count)))
        finally:
            done.set()
            if decoder:
                await decoder

    try:
        await level(min(concurrency, len(voices)))  # warm-up: fills the voice cache and, on a GPU, the allocator
        engine.step_times.clear()
        sync(args.device)
        reset_peak_memory(args.device)
        with Clock(args.device) as clock:
            turns = await level(concurrency)
    finally:
        await engine.close()  # stops the engine thread; the next level's first submit starts it again
    stats = engine.stats()
    rtfs = [t["rtf"] for t in turns]
    first_frames = sorted(t["first_frame_ms"] for t in turns)
    record = {
        "step_mode": stats.step_mode,
        "concurrency": concurrency,
        **clock.rates(sum(t["frames"] for t in turns)),
        "rtf_p50": statistics.median(rtfs),
        "rtf_max": max(rtfs),
        "first_frame_ms_p50": statistics.median(first_frames),
        "first_frame_ms_p95": first_frames[int(0.95 * (len(first_frames) - 1))],
        "first_frame_ms_max": first_frames[-1],
        "step_ms_p50": stats.step_ms_p50,
        "step_ms_p95": stats.step_ms_p95,
        "peak_mem_mb": peak_memory_mb(args.device),
    }
    if codec_engine:
        audio = sorted(t["first_audio_ms"] for t in turns if "first_audio_ms" in t)
        record["first_audio_ms_p50"] = statistics.median(audio) if audio else None
        record["codec_mode"] = codec_engine.decode_mode
    return record


def kernels_per_step(engine: SpeechEngine, batch: int) -> dict:
    """One decode step of `batch` turns (a frame each, no Reasoner pair) under torch.profiler. On CUDA: the kernels
    the GPU runs and the launches the host makes (kernel launches and graph launches); on a CPU: the operators the
    step dispatches (top-level aten ops, and inductor's fused kernels where compiled)."""
    from torch.profiler import ProfilerActivity, profile

    from model.chroma.sampling import SamplingParams
    from model.engines.decode_steps import RowInput

    rows = [RowInput(slot, 70, 1, None, SamplingParams(), 0, 1) for slot in range(batch)]  # idle slots: scratch work
    steps = engine.decode_steps
    steps.run(rows)  # a compiled shape compiles here, not under the profiler
    cuda = engine.speech.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        steps.run(rows)
    events = prof.events()
    if cuda:
        launches = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
        return {"batch": batch, "gpu_kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events),
                "host_launches": sum(e.name in launches for e in events)}

    def counted(event) -> bool:
        return event.name.startswith("aten::") or "cpp_fused" in event.name

    def top_level(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if counted(parent):
                return False
            parent = parent.cpu_parent
        return True

    return {"batch": batch, "cpu_ops": sum(counted(e) and top_level(e) for e in events)}


def bucket_summary(table: list[dict]) -> str:
    """'EFFICIENT_ATTENTION: 1x1x64 1x1x128 ...; fallback: ...' for the printout."""
    by_backend: dict[str, list[str]] = {}
    for row in table:
        name = row["sdpa_backend"] + ("" if row["graph"] or not row["fallback"] else " (padded eager)")
        by_backend.setdefault(name, []).append(row["bucket"])
    return "; ".join(f"{name}: {' '.join(buckets)}" for name, buckets in by_backend.items())


def run_mode(speech: SpeechModel, codec, args, step_mode: str, save=lambda records: None) -> tuple[list[dict], dict]:
    """Every level of one step mode -> (level records, the mode's buckets, capture figures and kernels per step).
    A failing build or level is recorded with its error, and the sweep goes on."""
    mode_record: dict = {"step_mode": step_mode}
    try:
        engine, codec_engine, setup = build_engines(speech, codec, args, step_mode)
    except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
        mode_record["error"] = f"engine build: {type(error).__name__}: {error}"
        print(f"{step_mode:>15}: engine build failed: {mode_record['error']}", flush=True)
        return [{"step_mode": step_mode, "concurrency": c, "error": mode_record["error"]} for c in args.concurrency], mode_record
    stats = engine.stats()
    mode_record.update(setup)
    mode_record.update({k: getattr(stats, k) for k in ("cuda_graphs", "eager_fallback_buckets", "graph_capture_s", "graph_pool_mb", "sdpa_backends")})
    mode_record["buckets"] = engine.decode_steps.step.bucket_table()
    mode_record["voice_prefill"] = {**asdict(engine.voice_prefill.stats()), "buckets": engine.voice_prefill.step.bucket_table()}
    if codec_engine is not None:
        codec_stats = codec_engine.stats()
        mode_record["codec"] = {k: getattr(codec_stats, k) for k in ("decode_mode", "cuda_graphs", "eager_fallback_buckets", "graph_capture_s", "graph_pool_mb")}
        mode_record["codec"]["buckets"] = codec_engine._decode_step.bucket_table()
    print(f"{step_mode:>15}: {stats.cuda_graphs} graphs, {stats.eager_fallback_buckets} buckets padded eager, capture "
          f"{stats.graph_capture_s:.1f} s, graph pool {stats.graph_pool_mb:.0f} MB, setup {setup['speech_setup_s']:.1f} s"
          + (f"; codec {mode_record['codec']['cuda_graphs']} graphs, {mode_record['codec']['graph_pool_mb']:.0f} MB" if codec_engine else ""), flush=True)
    if mode_record["buckets"]:
        print(f"{'':>15}  SDPA backend per bucket (batch x width x kv_len): {bucket_summary(mode_record['buckets'])}", flush=True)
    records = []
    for concurrency in args.concurrency:
        try:
            record = asyncio.run(run_level(engine, codec_engine, args, concurrency))
        except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
            record = {"step_mode": step_mode, "concurrency": concurrency, "error": f"{type(error).__name__}: {error}"}
            print(f"{step_mode:>15} {concurrency:>4} failed: {record['error']}", flush=True)
        else:
            print_level(record, codec is not None)
        records.append(record)
        save(records)  # what was measured survives a time limit that stops the run later
    stats = engine.stats()
    mode_record["eager_fallback_steps"] = stats.eager_fallback_steps
    mode_record["step_ms_by_batch"] = stats.step_ms_by_batch
    mode_record["kernels_per_step"] = []
    for batch in sorted({1, max(args.concurrency)}):
        try:
            mode_record["kernels_per_step"].append(kernels_per_step(engine, batch))
        except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
            mode_record["kernels_per_step"].append({"batch": batch, "error": f"{type(error).__name__}: {error}"})
    print(f"{step_mode:>15}: per step " + ", ".join(
        ", ".join(f"{k} {v}" for k, v in k_.items()) for k_ in mode_record["kernels_per_step"]), flush=True)
    return records, mode_record


HEADER = (f"{'mode':>15} {'conc':>4} {'frames/s':>9} {'/cpu s':>7} {'rtf p50':>8} {'rtf max':>8} {'1st frame ms':>13} "
          f"{'p95':>7} {'step p50':>9} {'step p95':>9} {'peak MB':>8}")


def print_level(record: dict, codec: bool) -> None:
    print(f"{record['step_mode']:>15} {record['concurrency']:>4} {record['frames_per_s']:>9.1f} {record['frames_per_cpu_s']:>7.1f} "
          f"{record['rtf_p50']:>8.3f} {record['rtf_max']:>8.3f} {record['first_frame_ms_p50']:>13.1f} {record['first_frame_ms_p95']:>7.1f} "
          f"{record['step_ms_p50']:>9.2f} {record['step_ms_p95']:>9.2f} {record['peak_mem_mb']:>8.0f}"
          + (f" {record['first_audio_ms_p50'] or float('nan'):>13.1f}" if codec else ""), flush=True)


def capacity(records: list[dict], step_mode: str) -> int | None:
    """The highest concurrency whose every turn ran at RTF <= RTF_TARGET."""
    fitting = [r["concurrency"] for r in records if r["step_mode"] == step_mode and "error" not in r and r["rtf_max"] <= RTF_TARGET]
    return max(fitting) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint directory in the official layout (default: --size)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="RANDOM weights when no --checkpoint")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--frames", type=int, default=100, help="frames per turn (12.5 per second of audio)")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--stagger-ms", type=float, default=40.0, help="delay between turns joining")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--step-modes", default="auto", help="SpeechEngine step modes to compare, e.g. padded,cuda_graphs")
    parser.add_argument("--codec-mode", default="same", help="CodecEngine decode mode with --codec (same: the step mode's)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled modes")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of this process (default: torch's own choice)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="intra-op threads of the engine thread on a CPU")
    parser.add_argument("--codec", action="store_true", help="also stream-decode every turn with the CodecEngine")
    parser.add_argument("--baselines", default="upstream,speak_turn,generate_turn",
                        help="offline baselines to run first (comma-separated; empty for none)")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.compile_backend == "inductor":
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True  # inductor's fused kernels show in the profiler's count
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    speech = build_speech(args, dtype)
    codec = build_codec(args, dtype) if args.codec else None
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"RANDOM WEIGHTS, size {args.size}"
    print(f"{weights}, {args.device} {dtype}, {args.frames} frames per turn, threads {torch.get_num_threads()} "
          f"(engine thread on a CPU: {args.cpu_threads}), turns {args.stagger_ms:g} ms apart", flush=True)

    baselines = {}
    wanted = [b for b in args.baselines.split(",") if b]
    try:
        if "upstream" in wanted:
            baselines["upstream_style"], upstream_frames = upstream_style_rates(speech, args.frames, args.text_tokens, args.device)
        if "speak_turn" in wanted:
            baselines["speak_turn"], ours = speak_turn_rates(speech, args.frames, args.text_tokens, args.device)
            if "upstream" in wanted:
                baselines["upstream_style_frames_equal_speak_turn"] = upstream_frames == ours
        if "generate_turn" in wanted:
            baselines["generate_turn"] = generate_turn_rates(args, speech, codec, dtype, args.frames)
    except Exception as error:  # noqa: BLE001 - recorded, the engine sweep goes on
        baselines["error"] = f"{type(error).__name__}: {error}"
    for name, value in baselines.items():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in value.items()) if isinstance(value, dict) else value
        print(f"baseline {name}: {shown}", flush=True)

    print(HEADER + (f" {'1st audio ms':>13}" if codec is not None else ""))
    records, modes = [], []
    summary = {
        "weights": weights, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_threads": args.cpu_threads,
        "frames_per_turn": args.frames, "text_tokens": args.text_tokens, "stagger_ms": args.stagger_ms,
        "codec": args.codec, "baselines": baselines, "levels": records, "modes": modes,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }

    def save(mode_records=()):
        summary["levels"] = records + list(mode_records)
        summary[f"capacity_at_rtf_{RTF_TARGET}"] = {
            mode: capacity(summary["levels"], mode) for mode in sorted({r["step_mode"] for r in summary["levels"]})}
        summary["failures"] = sum("error" in r for r in summary["levels"] + modes)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2, default=str))

    for step_mode in args.step_modes.split(","):
        try:
            level_records, mode_record = run_mode(speech, codec, args, step_mode, save)
        except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
            mode_record = {"step_mode": step_mode, "error": f"{type(error).__name__}: {error}"}
            level_records = []
            print(f"{step_mode:>15}: failed: {mode_record['error']}", flush=True)
        records += level_records
        modes.append(mode_record)
        save()
    for mode, value in summary[f"capacity_at_rtf_{RTF_TARGET}"].items():
        print(f"{mode}: highest concurrency with per-turn RTF max <= {RTF_TARGET}: {value}")
    if args.json:
        print(f"wrote {args.json}")
    if summary["failures"]:
        sys.exit(f"{summary['failures']} levels or modes failed (recorded with their errors)")

if __name__ == "__main__":
    main()
