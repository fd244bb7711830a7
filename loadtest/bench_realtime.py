"""Live-call benchmark: N concurrent calls against a running cluster, at several N.

Every call streams espeak-ng speech in real time, then silence, and plays the reply on a real-time clock; its
second turn barges in one second into the reply. Printed per concurrency:
  v2v p50/p95      end of the caller's speech -> first reply audio at the client (the turn detector's silence
                   window included: subtract it, or compare with --early-start, for the engines' share)
  barge-in p50/p95 the caller starts talking over the reply -> the reply stopped at the client (realtime:
                   `response.done` cancelled; twilio: `clear`)
  underruns        replies whose real-time playback (200 ms jitter buffer) ran dry, of all replies (twilio: calls
                   whose line went quiet mid-reply), and for twilio the largest lead of unplayed audio queued

    chroma-serve up --set turns.max_frames=50
    python loadtest/bench_realtime.py [--calls 1,2,4,8] [--early-start] [--protocol realtime|twilio] [--json out.json]

Weights are RANDOM with the tiny checkpoint: timings only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.clients.realtime import RealtimeCaller  # noqa: E402
from cluster.clients.http import ChromaClient  # noqa: E402
from cluster.local.supervisor import LocalClusterSettings, client_api_key  # noqa: E402
from cluster.clients.phone import LINE_RATE, CarrierCall  # noqa: E402
from model.processing.audio import CODEC_RATE  # noqa: E402
from model.testing.speech import speak, speak_at  # noqa: E402


QUESTION = speak_at("Hello, can you tell me what the weather is like today?", CODEC_RATE)
INTERRUPTION = speak_at("Wait, stop, please.", CODEC_RATE)
VOICE_TEXT = "This is the voice you will hear in every reply."


async def realtime_call(url: str, key: str, voice_id: str, early_start: bool) -> dict:
    async with RealtimeCaller(url, key) as call:
        await call.configure(voice_id, "Be brief.", audio={
            "input": {"turn_detection": {"type": "server_vad", "early_start": early_start}}, "output": {"voice": voice_id}})
        await call.say(QUESTION)
        listening = asyncio.create_task(call.say(np.zeros(60 * CODEC_RATE, np.float32)))
        first = await call.next_reply()
        v2v = first.first_audio_at - call.speech_ended_at if first.first_audio_at else None
        listening.cancel()
        await asyncio.sleep(max(0.0, first.first_audio_at + 0.2 + first.audio_ms / 1000 - time.monotonic()))
        await call.say(QUESTION)
        listening = asyncio.create_task(call.say(np.zeros(60 * CODEC_RATE, np.float32)))
        await call.wait_for("response.output_audio.delta", after=len(call.events), timeout_s=120)
        await asyncio.sleep(1.0)
        listening.cancel()
        interrupted = time.monotonic()
        barge = asyncio.create_task(call.say(INTERRUPTION, trailing_silence_s=0.5))
        second = await call.next_reply()
        await barge
        stopped = second.done_at - interrupted if second.status == "cancelled" else None
        return {"v2v_s": v2v, "barge_in_s": stopped, "underruns": [first.underruns(), second.underruns()]}


async def twilio_call(url: str, key: str, voice_id: str, early_start: bool) -> dict:
    parameters = {"api_key": key, "voice_id": voice_id, "early_start": str(early_start).lower()}
    async with CarrierCall(url, parameters) as call:
        await call.say(QUESTION, CODEC_RATE)
        listening = asyncio.create_task(call.say(np.zeros(60 * LINE_RATE, np.float32), LINE_RATE))
        await call.wait(lambda r: r.media)
        v2v = call.received.media[0][0] - call.speech_ended_at
        await call.reply_over()
        listening.cancel()
        first_reply = len(call.received.media)
        await call.say(QUESTION, CODEC_RATE)
        listening = asyncio.create_task(call.say(np.zeros(60 * LINE_RATE, np.float32), LINE_RATE))
        await call.wait(lambda r: len(r.media) > first_reply)
        await asyncio.sleep(1.0)
        listening.cancel()
        interrupted = time.monotonic()
        barge = asyncio.create_task(call.say(INTERRUPTION, CODEC_RATE, trailing_silence_s=0.5))
        await call.wait(lambda r: r.clears)
        stopped = call.received.clears[0] - interrupted
        await barge
        return {"v2v_s": v2v, "barge_in_s": stopped, "underruns": [call.received.underruns],
                "max_lead_ms": call.received.max_lead_ms}


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


async def level(url: str, key: str, voice_id: str, calls: int, protocol: str, early_start: bool) -> dict:
    run = {"realtime": realtime_call, "twilio": twilio_call}[protocol]
    results = await asyncio.gather(*(run(url, key, voice_id, early_start) for _ in range(calls)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    results = [r for r in results if not isinstance(r, BaseException)]
    v2v, barge = [r["v2v_s"] for r in results], [r["barge_in_s"] for r in results]
    replies = [u for r in results for u in r["underruns"]]
    return {
        "calls": calls, "failed": len(failed), "errors": sorted({repr(e)[:120] for e in failed}),
        "v2v_ms_p50": _ms(percentile(v2v, 0.5)), "v2v_ms_p95": _ms(percentile(v2v, 0.95)),
        "barge_in_ms_p50": _ms(percentile(barge, 0.5)), "barge_in_ms_p95": _ms(percentile(barge, 0.95)),
        "replies_with_underruns": sum(1 for u in replies if u), "replies": len(replies),
        "underrun_gaps": sum(replies),
        "max_lead_ms": max((r.get("max_lead_ms", 0) for r in results), default=None) if protocol == "twilio" else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="the cluster (default: the local one)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--calls", default="1,2,4,8")
    parser.add_argument("--protocol", default="realtime", choices=["realtime", "twilio"])
    parser.add_argument("--early-start", action="store_true")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    settings = LocalClusterSettings()
    url = args.url or f"http://{settings.host}:{settings.port}"
    key = args.api_key or client_api_key(settings)
    async with ChromaClient(url, key) as client:
        voice = await client.create_voice("bench", VOICE_TEXT, *speak(VOICE_TEXT))
    rows = []
    print(f"protocol {args.protocol}, early start {'on' if args.early_start else 'off'} (RANDOM weights)")
    print(f"{'calls':>5} {'failed':>6} {'v2v p50':>8} {'v2v p95':>8} {'barge p50':>9} {'barge p95':>9} {'underruns':>10}"
          + (f" {'max lead ms':>11}" if args.protocol == "twilio" else ""))
    for calls in (int(n) for n in args.calls.split(",")):
        row = await level(url, key, voice["id"], calls, args.protocol, args.early_start)
        rows.append(row)
        print(f"{calls:>5} {row['failed']:>6} {row['v2v_ms_p50']!s:>8} {row['v2v_ms_p95']!s:>8} "
              f"{row['barge_in_ms_p50']!s:>9} {row['barge_in_ms_p95']!s:>9} "
              f"{row['replies_with_underruns']:>4}/{row['replies']:<5}"
              + (f" {row['max_lead_ms']!s:>11}" if args.protocol == "twilio" else ""))
        for error in row["errors"]:
            print(f"      error: {error}")
    if args.json:
        Path(args.json).write_text(json.dumps({"protocol": args.protocol, "early_start": args.early_start, "levels": rows}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
