"""Chaos under load: kill each stage while callers keep taking turns, and print what they saw.

Needs a local cluster (`chroma-serve up`; its CHROMA_LOCAL_* settings). For each stage (Ingress, Codec,
SpeechStack, Reasoner, the Serve proxy), `--callers` sessions take turns back to back; after `--warmup-s` one
replica of the stage is killed (`cluster.local.faults`), the load goes on until /readyz answers again and
`--settle-s` more. Per stage it prints:
  - turns in flight at the kill, and how many of them failed;
  - ms from the kill until a caller saw the error (first, and the slowest of the turns in flight);
  - s from the kill until the stage was back (/readyz 200 again);
  - turns refused meanwhile (503, told to retry: not lost);
  - turns lost beyond the ones in flight: admitted after the kill, then failed (should be 0).
Weights are RANDOM (tiny checkpoint): timings only.

    python loadtest/chaos.py [--stages SpeechStack,Codec,Reasoner,Ingress,proxy] [--callers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.clients.http import ApiError, ChromaClient  # noqa: E402
from cluster.local.faults import STAGES, FaultAgent  # noqa: E402
from cluster.local.supervisor import LocalClusterSettings, local_api_key  # noqa: E402
from model.testing.speech import synthetic_speech  # noqa: E402


@dataclass
class Turn:
    started: float
    ended: float = 0.0
    admitted: bool = False  # the reply started
    # done; refused (an error answer, or no connection: nothing started); failed (the reply broke off or ended in
    # an error event)
    outcome: str = "done"
    detail: str = ""


async def take_turn(client: ChromaClient, session_id: str, audio) -> Turn:
    turn = Turn(time.monotonic())
    try:
        async for event, data, _ in client.turn_events(session_id, audio, 16000):
            turn.admitted = True
            if event == "error":
                turn.outcome, turn.detail = "failed", data["error"]["code"]
    except ApiError as error:
        turn.outcome, turn.detail = "refused", error.code or str(error.status)
    except httpx.HTTPError as error:
        turn.outcome, turn.detail = "failed" if turn.admitted else "refused", type(error).__name__
    turn.ended = time.monotonic()
    return turn


async def callers(client: ChromaClient, sessions: list[str], stop: asyncio.Event, turns: list[Turn]) -> None:
    audio = synthetic_speech(16000, 1.0, seed=3)

    async def talk(session_id):
        while not stop.is_set():
            turn = await take_turn(client, session_id, audio)
            turns.append(turn)
            if turn.outcome != "done":
                await asyncio.sleep(0.5)  # as Retry-After asks

    await asyncio.gather(*(talk(s) for s in sessions))


async def until_ready(url: str, timeout_s: float = 900) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() - started < timeout_s:
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return float("nan")


async def run_stage(stage: str, args, url: str, client: ChromaClient, sessions: list[str], faults: FaultAgent) -> dict:
    await until_ready(url)
    turns: list[Turn] = []
    stop = asyncio.Event()
    load = asyncio.create_task(callers(client, sessions, stop, turns))
    await asyncio.sleep(args.warmup_s)
    killed_at = time.monotonic()
    await asyncio.to_thread(faults.kill, stage)
    back_s = await until_ready(url)
    await asyncio.sleep(args.settle_s)
    stop.set()
    await load
    in_flight = [t for t in turns if t.started < killed_at < t.ended]
    failed = [t for t in in_flight if t.outcome == "failed"]
    after = [t for t in turns if t.started > killed_at]
    error_ms = sorted(1000 * (t.ended - killed_at) for t in failed)
    return {
        "stage": stage, "turns": len(turns), "in_flight": len(in_flight), "in_flight_failed": len(failed),
        "error_ms_first": error_ms[0] if error_ms else float("nan"),
        "error_ms_max": error_ms[-1] if error_ms else float("nan"),
        "back_s": back_s, "refused_while_down": sum(t.outcome == "refused" for t in after),
        "lost_beyond_in_flight": sum(t.outcome == "failed" for t in after),
        "failure_kinds": sorted({t.detail for t in turns if t.outcome != "done"}),
        "turn_log": [asdict(t) for t in turns],
    }


async def run(args) -> list[dict]:
    local = LocalClusterSettings()
    url = f"http://{local.host}:{local.port}"
    faults = await asyncio.to_thread(FaultAgent, local)
    rows = []
    try:
        async with ChromaClient(url, local_api_key(local), timeout_s=600) as client:
            voice = await client.create_voice("chaos", "A voice under fire.", synthetic_speech(24000, 1.5, seed=2), 24000)
            sessions = [(await client.create_session(voice["id"]))["id"] for _ in range(args.callers)]
            print(" | ".join(HEADER), flush=True)
            for stage in args.stages:
                row = await run_stage(stage, args, url, client, sessions, faults)
                rows.append(row)
                print(table_row(row), flush=True)
    finally:
        faults.close()
    return rows


HEADER = ("stage", "turns", "in flight at kill (failed)", "error seen ms first/max", "back after s",
          "refused while down", "lost beyond in-flight", "what callers saw")


def table_row(row: dict) -> str:
    return " | ".join((
        row["stage"], str(row["turns"]), f"{row['in_flight']} ({row['in_flight_failed']})",
        f"{row['error_ms_first']:.0f}/{row['error_ms_max']:.0f}", f"{row['back_s']:.1f}", str(row["refused_while_down"]),
        str(row["lost_beyond_in_flight"]), ", ".join(row["failure_kinds"]) or "-",
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=lambda s: s.split(","), default=["SpeechStack", "Codec", "Ingress", "proxy",
                                                                            "Reasoner"])
    parser.add_argument("--callers", type=int, default=2)
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--json", help="also write the figures (and every turn) here")
    args = parser.parse_args()
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        sys.exit(f"unknown stages {sorted(unknown)}: choose from {', '.join(STAGES)}")
    print("RANDOM WEIGHTS: timings only.", flush=True)
    rows = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
