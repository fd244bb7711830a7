"""Reasoner figures: time to first (token, hidden) pair and pairs/s at several concurrency levels, per engine.

Each level starts N conversations at once (each with its own 2 s of speech and a text line, so they share only the
system prompt) and streams up to --max-tokens pairs from each. Reported per level: time to first pair (median and
worst over the N streams), aggregate pairs/s (all pairs / wall time of the level) and pairs/s per stream. Engine
start-up is reported apart. Default checkpoint: the tiny RANDOM-WEIGHT one (made on first use), whose figures show
engine overheads, not a real model's speed.

Usage: python loadtest/bench_reasoner.py [--checkpoint DIR] [--engines hf,vllm] [--levels 1,2,4,8,16]
                                         [--max-tokens 48] [--eager]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def thinker_dir(checkpoint: str | None, workdir: Path) -> Path:
    from model.chroma.checkpoint import split_thinker
    from model.testing.tiny import write_tiny_checkpoint

    if checkpoint is None:
        checkpoint = str(write_tiny_checkpoint(workdir / "tiny", seed=0))
        print(f"using the tiny RANDOM-WEIGHT checkpoint in {checkpoint}")
    path = Path(checkpoint)
    if (path / "config.json").is_file() and '"thinker_config"' in (path / "config.json").read_text():
        path = split_thinker(path, workdir / "thinker")
    return path


def conversation(i: int):
    from model.processing.processor import Conversation, Message
    from tests.conftest import speech_like

    return Conversation(
        "You are a helpful voice assistant.",
        [Message("user", text="Thank you, goodbye.", audio=speech_like(16000, 2.0, seed=100 + i), sample_rate=16000)],
    )


async def one_stream(reasoner, conv, max_tokens: int, started: float) -> tuple[float, int]:
    first, count = None, 0
    async for _token, _hidden in reasoner.stream(conv, max_tokens):
        if first is None:
            first = time.perf_counter() - started
        count += 1
    return first, count


async def run_level(reasoner, level: int, max_tokens: int, seed_base: int) -> dict:
    convs = [conversation(seed_base + i) for i in range(level)]
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(reasoner, c, max_tokens, started) for c in convs))
    wall = time.perf_counter() - started
    firsts = [f for f, _ in results]
    pairs = sum(n for _, n in results)
    return {
        "level": level,
        "ttfp_p50_ms": 1000 * statistics.median(firsts),
        "ttfp_max_ms": 1000 * max(firsts),
        "pairs": pairs,
        "pairs_per_s": pairs / wall,
        "per_stream_pairs_per_s": pairs / wall / level,
        "wall_s": wall,
    }


async def bench(reasoner, levels: list[int], max_tokens: int) -> list[dict]:
    await one_stream(reasoner, conversation(0), 4, time.perf_counter())  # warm-up (compile, first-call costs)
    rows = []
    for n, level in enumerate(levels):
        rows.append(await run_level(reasoner, level, max_tokens, seed_base=1000 * (n + 1)))
    return rows


def make_reasoner(engine: str, path: Path, eager: bool):
    if engine == "hf":
        from model.reasoner.hf import HFReasoner

        return HFReasoner.from_pretrained(path)
    from model.reasoner.vllm.engine import VLLMReasoner

    return VLLMReasoner(path, cpu_kvcache_gib=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", 1)), enforce_eager=eager)


async def run_engine(engine: str, path: Path, levels: list[int], max_tokens: int, eager: bool) -> list[dict]:
    started = time.perf_counter()
    reasoner = make_reasoner(engine, path, eager)  # blocks while vLLM starts: nothing else runs yet
    print(f"{engine}: start-up {time.perf_counter() - started:.1f} s", flush=True)
    try:
        rows = await bench(reasoner, levels, max_tokens)
        for row in rows:
            print(f"  {engine} x{row['level']}: {row['pairs']} pairs in {row['wall_s']:.1f} s", flush=True)
        return rows
    finally:
        await reasoner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="Chroma checkpoint or thinker directory (default: tiny random weights)")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in args.levels.split(",")]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"hf", "vllm"}
    if unknown:
        parser.error(f"unknown engine(s) {sorted(unknown)}; use hf and/or vllm")

    table = []
    with tempfile.TemporaryDirectory(prefix="bench-reasoner-") as tmp:
        path = thinker_dir(args.checkpoint, Path(tmp))
        for engine in engines:
            for row in asyncio.run(run_engine(engine, path, levels, args.max_tokens, args.eager)):
                table.append({"engine": engine, **row})

    print()
    print(f"{'engine':<6} {'conc':>4} {'TTFP p50 ms':>12} {'TTFP max ms':>12} {'pairs':>6} {'pairs/s':>9} {'pairs/s/stream':>15}")
    for r in table:
        print(
            f"{r['engine']:<6} {r['level']:>4} {r['ttfp_p50_ms']:>12.1f} {r['ttfp_max_ms']:>12.1f} {r['pairs']:>6} "
            f"{r['pairs_per_s']:>9.1f} {r['per_stream_pairs_per_s']:>15.1f}"
        )


if __name__ == "__main__":
    main()
