"""Timing whole turns through a `LocalTurnBackend` (the API's one-process backend): TTFA, time per frame and RTF, and
their summary per concurrency. Shared by the cluster benchmark, the overload probe and the one-process turn bench."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import datetime, timezone

import numpy as np

from cluster.pipeline.local import LocalTurnBackend
from cluster.pipeline.history import UserTurn
from cluster.pipeline.turn import AudioChunk, TurnDone
from cluster.state.store import Session, Voice

FRAME_SECONDS = 0.08


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class TurnTiming:
    def __init__(self, ttfa_s: float | None, total_s: float, frames: int):
        self.ttfa_s, self.total_s, self.frames = ttfa_s, total_s, frames

    @property
    def per_frame_s(self) -> float:
        return self.total_s / max(self.frames, 1)

    @property
    def rtf(self) -> float:
        return self.total_s / max(self.frames * FRAME_SECONDS, 1e-9)


async def engine_turn(backend: LocalTurnBackend, voice: Voice, caller: np.ndarray) -> TurnTiming:
    now = datetime.now(timezone.utc)
    session = Session(id=f"sess_{uuid.uuid4().hex}", tenant="bench", voice_id=voice.id, created_at=now, updated_at=now)
    started, first, frames = time.perf_counter(), None, 0
    plan = backend.history.plan(session, UserTurn.of("item_bench", caller))
    async for event in backend.run_turn(f"turn-{uuid.uuid4().hex}", voice, session, plan):
        if isinstance(event, AudioChunk) and first is None:
            first = time.perf_counter() - started
        elif isinstance(event, TurnDone):
            frames = event.frames
    return TurnTiming(first, time.perf_counter() - started, frames)


async def measure(run_one, concurrency: int, rounds: int) -> list[TurnTiming]:
    timings = []
    for _ in range(rounds):
        timings += await asyncio.gather(*(run_one() for _ in range(concurrency)))
    return timings


def summary(timings: list[TurnTiming]) -> dict:
    ttfa = [t.ttfa_s for t in timings if t.ttfa_s is not None]
    return {
        "turns": len(timings),
        "frames_p50": statistics.median(t.frames for t in timings),
        "ttfa_ms_p50": 1000 * percentile(ttfa, 50),
        "ttfa_ms_p95": 1000 * percentile(ttfa, 95),
        "ms_per_frame_p50": 1000 * percentile([t.per_frame_s for t in timings], 50),
        "rtf_p50": percentile([t.rtf for t in timings], 50),
        "rtf_max": max(t.rtf for t in timings),
    }
