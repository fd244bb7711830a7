"""The API's Prometheus metrics (one registry per app, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttfa = Histogram(
            "chroma_turn_ttfa_seconds", "Request received to first reply audio sent", registry=self.registry,
            buckets=(0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
        )
        self.rtf = Histogram(
            "chroma_turn_rtf", "Turn wall time / reply audio duration", registry=self.registry,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0),
        )
        self.live = Gauge("chroma_live_turns", "Turns streaming now", registry=self.registry)
        self.waiting = Gauge(
            "chroma_turns_waiting", "Queue depth: turns accepted that have not sent their first audio yet",
            registry=self.registry,
        )
        self.frames = Counter("chroma_frames", "Reply audio frames generated (12.5 per second)", registry=self.registry)
        self.turns = Counter("chroma_turns", "Turns by outcome", ["outcome"], registry=self.registry)
        self.admissions = Counter(
            "chroma_admissions", "Turns and calls admitted (outcome admitted, or queued: after a wait) or refused "
            "(outcome: the error code)", ["kind", "outcome"], registry=self.registry,
        )
        self.capacity = Gauge(
            "chroma_capacity", "Turns and calls the cluster holds at once (its smallest stage)", registry=self.registry,
        )
        self.queued = Gauge("chroma_admission_line", "Turns waiting for capacity", registry=self.registry)
        self.errors = Counter("chroma_errors", "Error responses and failed streams by kind", ["kind"], registry=self.registry)
