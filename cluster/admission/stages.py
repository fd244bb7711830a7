"""What admission control reads of each stage: whether it takes new turns now, and how many it holds at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.engines.realtime import Headroom


@dataclass
class StageStatus:
    """One stage as the API sees it: whether it takes new turns now, and how many it holds at once across its live
    replicas (what the engines say they keep real-time, at most their slots: model.engines.realtime; None: this
    stage sets no bound)."""

    name: str
    ready: bool
    capacity: int | None = None
    replicas: int = 1
    problem: str = ""  # why it is not ready, in words fit for a client (no internals)
    step_ms: dict[int, float] = field(default_factory=dict)  # one replica's measured curve (Headroom.step_ms)

    @classmethod
    def of(cls, name: str, headroom: Headroom, replicas: int = 1, problem: str = "") -> StageStatus:
        """`replicas` live replicas with `headroom` each; not ready when there is a problem or no replica."""
        problem = problem or ("" if replicas else "no live replica")
        if problem:
            return cls(name, False, 0, replicas, problem)
        turns = None if headroom.turns is None else headroom.turns * replicas
        return cls(name, True, turns, replicas, step_ms=headroom.step_ms)

    @classmethod
    def across(cls, name: str, answers: list[Headroom], replicas: int, problem: str = "") -> StageStatus:
        """`replicas` live replicas, of which `answers` are the latest headroom of each that answered (replicas
        differ: one that autoscaling added during a burst may have calibrated under contention). A replica not
        heard from yet counts as the mean of those that were."""
        if problem or not answers or any(a.turns is None for a in answers):
            return cls.of(name, answers[-1] if answers else Headroom(None), replicas, problem)
        total = sum(a.turns for a in answers)
        total += int(max(replicas - len(answers), 0) * total / len(answers))
        return cls(name, True, total, max(replicas, len(answers)), step_ms=answers[-1].step_ms)

    def down(self, problem: str) -> StageStatus:
        """This stage taken as not ready, for `problem`."""
        return StageStatus.of(self.name, Headroom(None), self.replicas, problem)
