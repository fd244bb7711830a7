"""Real-time headroom, measured: how many turns an engine can batch and still make audio faster than it plays.

An engine steps all its live turns together, so a step of B turns must finish within the audio it makes (one 80 ms
frame for the SpeechEngine, one chunk for the codec), with room to spare for the other stages on the same hardware.
`StepTimes` keeps the recent time of a step per batch size, as the engine measured it under whatever load and
contention it really had, and answers how large a batch still fits that budget. Slot counts are only the upper
bound: admission control reads this figure (the engines' `realtime_*` methods) as the stage's capacity.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# The engines' `max_step_rtf` setting.
StepRtf = Annotated[
    Annotated[float, Field(gt=0, le=1)] | None,
    Field(description="a replica takes as many turns as keep its measured step time within this fraction of the "
          "audio a step makes (0.8: 80 ms of audio in at most 64 ms); null: its slots alone bound it"),
]


class StepTimes:
    """Exponentially weighted step seconds per batch size. Written by the engine's stepping thread and read from
    the event loop: the one dict is replaced, never mutated in place, so a reader always sees a whole one."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self._seconds: dict[int, float] = {}

    def record(self, batch: int, seconds: float) -> None:
        seconds_by_batch = dict(self._seconds)
        previous = seconds_by_batch.get(batch)
        seconds_by_batch[batch] = seconds if previous is None else previous + self.weight * (seconds - previous)
        self._seconds = seconds_by_batch

    def largest_batch(self, budget_s: float, max_batch: int) -> int:
        """The largest batch (1 to `max_batch`) whose step is expected within `budget_s`; 1 at least, so a replica
        always serves one turn, and 1 before anything was measured (that turn measures it).

        Up to the largest batch measured, a step takes at most what the next larger measured batch took (a step
        costs more with more rows). Beyond it, the cost is taken to grow in proportion to the rows, the worst case,
        until load shows better: capacity grows as larger batches are seen to keep up."""
        measured = self._seconds
        if not measured:
            return 1
        largest = max(measured)
        fits = 0
        for batch in range(1, max_batch + 1):
            if batch <= largest:
                expected = min(s for b, s in measured.items() if b >= batch)
            else:
                expected = measured[largest] * batch / largest
            if expected > budget_s:
                break
            fits = batch
        return max(fits, 1)

    def snapshot_ms(self) -> dict[int, float]:
        """Step ms per batch size, for stats."""
        return {batch: round(1000 * s, 2) for batch, s in sorted(self._seconds.items())}
