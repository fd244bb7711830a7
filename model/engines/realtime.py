"""Real-time headroom, measured: how many turns an engine can batch and still make audio faster than it plays.

An engine steps all its live turns together, so a step of B turns must finish within the audio it makes (one 80 ms
frame for the SpeechEngine, one chunk for the codec), with room to spare for the other stages on the same hardware.
`StepTimes` is the engine's curve of step time against batch size, and answers how large a batch still fits that
budget. `RealtimeBound` is the rule every engine applies to it: its slots are only the upper bound, and admission
control reads the bound's `capacity()` (through the engines' `headroom()`) as the stage's capacity.

How the curve is learned:
- **Calibration at start**: before its replica reports ready, an engine runs a padded step (padding rows only, so it
  changes no turn's state) at every batch bucket, a few times each. No turn pays for it, and a replica that starts
  (or that the autoscaler adds) knows its whole curve before its first turn.
- **Real steps** keep adding samples at the batch sizes they run, with whatever contention they really meet. Each
  batch size keeps its last few samples; its time is their median (one slow step is noise, not a trend).
- **Ageing**: a sample older than `max_age_s` stops counting where its batch size has newer ones. A batch size whose
  samples are all that old is dropped where a larger batch was measured since (the line through the newer points
  covers it), and kept otherwise: it is still the best knowledge of the curve's top.
- **Re-probing**: while the engine runs fewer turns than its estimate allows, the bucket just above the estimate is
  measured again with a padded step every `reprobe_s` at most (`probe_batch`). An estimate lowered by a burst of
  contention thus recovers once the burst is over, within about `max_age_s + reprobe_s`. A probe costs one padded
  step of that bucket (the tiny model on this CPU: 7-28 ms, 1-16 rows) every `reprobe_s` (5 s) at most.
- **Between measured batch sizes** the time is interpolated linearly on the curve made non-decreasing (a step of
  more rows never costs less). Beyond the largest measured batch nothing is assumed: the estimate stops there, and
  the probe measures the next bucket.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Headroom:
    """What one replica of a stage holds at once in real time, and the measured curve behind the figure."""

    turns: int | None  # None: the stage sets no bound
    step_ms: dict[int, float] = field(default_factory=dict)  # expected ms of a step per batch size (StepTimes)
    replica: str | None = None  # which replica answered, where there may be several


CALIBRATION_RUNS = 3  # padded steps per bucket at start (the first of them also warms the bucket's shapes)


class StepTimes:
    """Recent step seconds per batch size. Written by the engine's stepping thread and read from the event loop:
    the one dict is replaced, never mutated in place, so a reader always sees a whole one."""

    def __init__(self, window: int = 24, max_age_s: float = 10.0, reprobe_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.window, self.max_age_s, self.reprobe_s, self.clock = window, max_age_s, reprobe_s, clock
        self._samples: dict[int, tuple[tuple[float, float], ...]] = {}  # batch -> ((at, seconds), ...), oldest first
        self.calibration_s: float | None = None  # how long the calibration at start took

    def record(self, batch: int, seconds: float) -> None:
        samples = dict(self._samples)
        samples[batch] = (*samples.get(batch, ())[-(self.window - 1):], (self.clock(), seconds))
        self._samples = samples

    def calibrate(self, step: Callable[[int], None], buckets: list[int]) -> None:
        """Measure `step(batch)` (a padded step of padding rows only) at every bucket, largest first."""
        started = time.perf_counter()
        for batch, timed in calibration_runs(buckets):
            if timed:
                self.measure(step, batch)
            else:
                step(batch)
        self.calibration_s = time.perf_counter() - started

    def measure(self, step: Callable[[int], None], batch: int) -> None:
        """Run `step(batch)` (a padded step) and record its time."""
        began = time.perf_counter()
        step(batch)
        self.record(batch, time.perf_counter() - began)

    def curve(self) -> list[tuple[int, float]]:
        """(batch, expected seconds) at the batch sizes that count now, ascending and non-decreasing."""
        now, samples = self.clock(), self._samples
        knots, worst, newer_above = [], 0.0, float("-inf")
        for batch in sorted(samples, reverse=True):
            fresh = [s for at, s in samples[batch] if now - at <= self.max_age_s]
            newest = samples[batch][-1][0]
            if fresh or newest >= newer_above:  # else aged out: a larger batch measured since describes it
                knots.append((batch, statistics.median(fresh or [s for _, s in samples[batch]])))
            newer_above = max(newer_above, newest)
        knots.reverse()
        for n, (batch, seconds) in enumerate(knots):
            worst = max(worst, seconds)
            knots[n] = (batch, worst)
        return knots

    def largest_batch(self, budget_s: float, max_batch: int) -> int:
        """The largest batch (1 to `max_batch`) whose step is expected within `budget_s`; 1 at least, so a replica
        always serves one turn, and 1 before anything was measured (that turn measures it)."""
        knots = self.curve()
        fits = 0
        for batch in range(1, max_batch + 1):
            expected = _interpolate(knots, batch)
            if expected is None or expected > budget_s:
                break
            fits = batch
        return max(fits, 1)

    def probe_batch(self, live: int, budget_s: float, max_batch: int, buckets: list[int]) -> int | None:
        """The bucket to measure now with a padded step, or None: with fewer than the estimated capacity live, the
        smallest bucket above the estimate, once its newest sample is `reprobe_s` old."""
        capacity = self.largest_batch(budget_s, max_batch)
        above = [b for b in buckets if b > capacity]
        if live >= capacity or not above:
            return None
        newest = self._samples.get(above[0], ((float("-inf"), 0.0),))[-1][0]
        return above[0] if self.clock() - newest >= self.reprobe_s else None

    def snapshot_ms(self) -> dict[int, float]:
        """Expected step ms at each batch size that counts now (the curve), for stats."""
        return {batch: round(1000 * s, 2) for batch, s in self.curve()}


@dataclass
class RealtimeBound:
    """How many turns an engine holds at once and keeps real-time: its `limit` (slots, streams), or fewer where its
    measured steps (`steps`) say a batch would take more than `max_step_rtf` of the audio a step makes per turn
    (`step_s`). Also which bucket to probe next, and the calibration; without a bound there is nothing to measure."""

    steps: StepTimes
    step_s: float  # seconds of audio one step makes for each turn in it
    max_step_rtf: float | None  # None: the limit alone bounds it
    limit: int
    buckets: list[int]  # the batch sizes a padded step runs

    @property
    def budget_s(self) -> float | None:
        return None if self.max_step_rtf is None else self.max_step_rtf * self.step_s

    def capacity(self) -> int:
        """Read only: the current figure from the curve as it is."""
        budget = self.budget_s
        return self.limit if budget is None else self.steps.largest_batch(budget, self.limit)

    def headroom(self) -> Headroom:
        """Read only: the capacity and the curve behind it."""
        return Headroom(self.capacity(), self.steps.snapshot_ms())

    def next_probe(self, live: int) -> int | None:
        """The bucket to measure now with a padded step (`StepTimes.probe_batch`) with `live` turns running, or None."""
        budget = self.budget_s
        return None if budget is None else self.steps.probe_batch(live, budget, self.limit, self.buckets)

    def reprobe(self, step: Callable[[int], None], live: int) -> None:
        """Measure `step(batch)` (a padded step) at the bucket `next_probe` names, where it names one."""
        if (batch := self.next_probe(live)) is not None:
            self.steps.measure(step, batch)

    def calibrate(self, step: Callable[[int], None]) -> None:
        """`StepTimes.calibrate` at every bucket, where there is a bound."""
        if self.max_step_rtf is not None:
            self.steps.calibrate(step, self.buckets)


def calibration_runs(buckets: list[int]) -> list[tuple[int, bool]]:
    """(batch, timed) in calibration order: every bucket, largest first, an untimed run (it makes what the bucket's
    shapes need: allocations, cached tables) then CALIBRATION_RUNS timed ones."""
    return [(batch, run > 0) for batch in reversed(buckets) for run in range(CALIBRATION_RUNS + 1)]


def _interpolate(knots: list[tuple[int, float]], batch: int) -> float | None:
    """Linear between the knots around `batch`; below the first, the first's time; beyond the last, unknown."""
    if not knots or batch > knots[-1][0]:
        return None
    if batch <= knots[0][0]:
        return knots[0][1]
    for (b0, s0), (b1, s1) in zip(knots, knots[1:]):
        if batch <= b1:
            return s0 + (batch - b0) / (b1 - b0) * (s1 - s0)
