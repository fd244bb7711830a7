"""Cluster benchmark: end-to-end TTFA and RTF over HTTP, next to the same engines in one process.

Needs a running local cluster (`chroma-serve up`); reads its rendered Serve config for the checkpoint and
settings. For each concurrency it runs rounds of simultaneous turns (fresh sessions, the same voice and caller
audio, greedy) twice:
  - engines: VLLMReasoner -> SpeechEngine -> CodecEngine in this process (LocalTurnBackend), no Ray, no HTTP,
    no Redis; TTFA from the call to the first PCM chunk;
  - cluster: POST /v1/sessions/{id}/turns through the Serve proxy, Ingress, Codec, SpeechStack, Reasoner and
    Redis; TTFA from the end of the upload to the first audio chunk at the client.
Overhead per frame = cluster time per frame / engine time per frame - 1 (targets: <= 15 %, and <= 50 ms of
extra TTFA). Weights are RANDOM (tiny checkpoint): timings only, the audio is noise.

    chroma-serve up --set turns.max_frames=50
    python loadtest/bench_cluster.py [--concurrency 1,2,4,8] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.clients.http import ChromaClient, TurnReply  # noqa: E402
from cluster.local.supervisor import APP_NAME, LocalClusterSettings, local_api_key  # noqa: E402
from cluster.pipeline.local import LocalTurnBackend  # noqa: E402
from cluster.settings import AppConfig  # noqa: E402
from cluster.state.store import Voice  # noqa: E402
from loadtest.turn_timing import TurnTiming, engine_turn, measure, summary  # noqa: E402
from model.testing.speech import synthetic_speech  # noqa: E402

VOICE_TEXT = "This is the voice you will hear in every reply."


async def cluster_turn(client: ChromaClient, voice_id: str, caller: np.ndarray) -> TurnTiming:
    session = await client.create_session(voice_id)
    reply: TurnReply = await client.turn(session["id"], caller, 16000)
    await client.delete_session(session["id"])
    return TurnTiming(reply.ttfa_s, reply.total_s, reply.done["frames"])


async def run_engines(args, config: AppConfig, caller: np.ndarray, voice_audio: np.ndarray) -> dict:
    backend = LocalTurnBackend.from_config(config)  # the Reasoner the config names: vLLM in the CPU-dev profile
    try:
        prompt = await backend.clone_voice(VOICE_TEXT, voice_audio, 24000)
        voice = Voice.new("bench", "bench", VOICE_TEXT, prompt.transcript_ids.tolist(), prompt.codes.numpy(),
                          prompt.valid_frames)
        await engine_turn(backend, voice, caller)  # warm-up
        return {c: summary(await measure(lambda: engine_turn(backend, voice, caller), c, args.rounds)) for c in args.concurrency}
    finally:
        await backend.close()  # stops the vLLM engine too


async def run_cluster(args, url: str, api_key: str, caller: np.ndarray, voice_audio: np.ndarray) -> dict:
    async with ChromaClient(url, api_key) as client:
        voice = await client.create_voice("bench", VOICE_TEXT, voice_audio, 24000)
        await cluster_turn(client, voice["id"], caller)  # warm-up
        results = {}
        for c in args.concurrency:
            results[c] = summary(await measure(lambda: cluster_turn(client, voice["id"], caller), c, args.rounds))
        await client.http.delete(f"/v1/voices/{voice['id']}")
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of simultaneous turns per concurrency")
    parser.add_argument("--caller-seconds", type=float, default=2.0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    local = LocalClusterSettings()
    config_path = local.home / "serve.yaml"
    if not config_path.is_file():
        sys.exit(f"no local cluster config at {config_path}: run `chroma-serve up` first")
    (app,) = [a for a in yaml.safe_load(config_path.read_text())["applications"] if a["name"] == APP_NAME]
    url = f"http://{local.host}:{local.port}"
    caller = synthetic_speech(16000, args.caller_seconds, seed=1)
    voice_audio = synthetic_speech(24000, 2.0, seed=2)
    config = AppConfig.model_validate(app["args"])
    print(f"RANDOM WEIGHTS ({config.checkpoint.path}): timings only. cluster {url}; concurrency {args.concurrency}, "
          f"{args.rounds} rounds, max_frames {config.turns.max_frames}", flush=True)

    cluster = asyncio.run(run_cluster(args, url, local_api_key(local), caller, voice_audio))
    engines = asyncio.run(run_engines(args, config, caller, voice_audio))

    header = ("conc", "TTFA eng p50", "TTFA clu p50", "p95", "+TTFA ms", "ms/frame eng", "ms/frame clu",
              "overhead", "RTF clu p50", "RTF clu max")
    print(" | ".join(header))
    rows = []
    for c in args.concurrency:
        e, k = engines[c], cluster[c]
        row = {
            "concurrency": c, "engine": e, "cluster": k,
            "ttfa_overhead_ms": k["ttfa_ms_p50"] - e["ttfa_ms_p50"],
            "frame_overhead": k["ms_per_frame_p50"] / e["ms_per_frame_p50"] - 1,
        }
        rows.append(row)
        print(f"{c:>4} | {e['ttfa_ms_p50']:>12.0f} | {k['ttfa_ms_p50']:>12.0f} | {k['ttfa_ms_p95']:>3.0f} | "
              f"{row['ttfa_overhead_ms']:>8.0f} | {e['ms_per_frame_p50']:>12.1f} | {k['ms_per_frame_p50']:>12.1f} | "
              f"{100 * row['frame_overhead']:>7.1f}% | {k['rtf_p50']:>11.3f} | {k['rtf_max']:>11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
