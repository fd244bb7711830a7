"""Offline figures: load time and peak RSS per component, and `generate_turn` frames/s (batch of one).

Each component loads in a fresh subprocess so its peak RSS is its own. Default: the tiny RANDOM-WEIGHT
checkpoint (made on first use). Usage: python loadtest/bench_offline.py [--checkpoint DIR] [--frames N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure_component(checkpoint: str, component: str, dtype: str) -> dict:
    # Import the model code first, so the figures are the load alone, not Python imports.
    from transformers import MimiModel, Qwen2_5OmniThinkerForConditionalGeneration  # noqa: F401

    from model.chroma.checkpoint import load_component
    from model.chroma.speech import SpeechModel  # noqa: F401

    baseline = current_rss_mb()
    started = time.perf_counter()
    load_component(checkpoint, component, dtype=dtype)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"component": component, "load_s": seconds, "peak_rss_mb": peak, "added_rss_mb": current_rss_mb() - baseline}


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--component", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.component:
        print(json.dumps(measure_component(args.checkpoint, args.component, args.dtype)))
        return

    from model.testing.tiny import ensure_tiny_checkpoint

    checkpoint = args.checkpoint or str(ensure_tiny_checkpoint())
    print(f"checkpoint {checkpoint}" + ("  (RANDOM WEIGHTS)" if (Path(checkpoint) / "RANDOM_WEIGHTS.txt").exists() else ""))
    print(f"{'component':<10}{'load s':>9}{'peak RSS MB':>13}{'added MB':>10}")
    for component in ("thinker", "speech", "codec"):
        out = subprocess.run(
            [sys.executable, __file__, "--checkpoint", checkpoint, "--component", component, "--dtype", args.dtype],
            capture_output=True, text=True, check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{component:<10}{row['load_s']:>9.2f}{row['peak_rss_mb']:>13.0f}{row['added_rss_mb']:>10.1f}")

    import torch

    from model.offline import OfflineChroma
    from model.processing.processor import Conversation, Message
    from model.testing.speech import synthetic_speech

    chroma = OfflineChroma(checkpoint, dtype=args.dtype)
    voice = chroma.voice("This is the voice you will hear.", synthetic_speech(24000, 2.0), 24000)
    conversation = Conversation("You are a helpful voice assistant.", [Message("user", audio=synthetic_speech(16000, 2.0, 1), sample_rate=16000)])
    chroma.reply(conversation, voice, max_frames=4)  # warm-up
    runs = [chroma.reply(conversation, voice, max_frames=args.frames) for _ in range(3)]
    best = min(runs, key=lambda r: r.timings["total_s"])
    frames = best.frames.shape[0]
    print(f"generate_turn: {frames} frames in {best.timings['total_s']:.2f} s -> {frames / best.timings['speech_s']:.1f} frames/s "
          f"(speech stack only), {frames / best.timings['total_s']:.1f} frames/s end to end, RTF {best.real_time_factor:.3f}, "
          f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
