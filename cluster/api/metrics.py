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
            "chroma_capacity", "Reply places: turns and live calls' replies the cluster generates at once (its "
            "smallest stage)", registry=self.registry,
        )
        self.call_budget = Gauge(
            "chroma_call_budget", "Live calls the cluster holds at once: its reply places times the oversubscription",
            registry=self.registry,
        )
        self.reply_places_busy = Gauge(
            "chroma_reply_places_busy", "Reply places this Ingress holds now (turns, and calls' replies generating)",
            registry=self.registry,
        )
        self.call_reply_share = Gauge(
            "chroma_call_reply_share", "Of the ended calls' time, the share their replies held a reply place",
            registry=self.registry,
        )
        self.queued = Gauge("chroma_admission_line", "Turns and replies waiting for a reply place",
                            registry=self.registry)
        self.admission_wait = Histogram(
            "chroma_admission_wait_seconds", "Time in the admission line before a place (0: admitted at once)",
            ["kind"], registry=self.registry, buckets=(0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0),
        )
        self.prompt_tokens = Counter(
            "chroma_reasoner_prompt_tokens", "Reasoner prompt positions of completed turns", registry=self.registry,
        )
        self.cached_tokens = Counter(
            "chroma_reasoner_cached_tokens", "Of those, served by vLLM's prefix cache (hit rate: the ratio of the two)",
            registry=self.registry,
        )
        self.history_dropped = Counter(
            "chroma_history_dropped", "History the sessions' truncation removed to fit the Reasoner's context: "
            "messages, and caller audio whose message kept its text", ["what"], registry=self.registry,
        )
        self.errors = Counter("chroma_errors", "Error responses and failed streams by kind", ["kind"], registry=self.registry)
        # Live calls (cluster.calls).
        self.calls_live = Gauge("chroma_calls_live", "Live calls now", ["protocol"], registry=self.registry)
        self.calls_refused = Counter("chroma_calls_refused", "Calls refused at the handshake, by reason", ["reason"],
                                     registry=self.registry)
        latency_buckets = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
        self.voice_to_voice = Histogram(
            "chroma_call_voice_to_voice_seconds",
            "End of the caller's speech to the first reply audio sent; vad_window=included counts the silence the "
            "turn detector waits for, excluded starts when it committed the turn", ["vad_window"],
            registry=self.registry, buckets=latency_buckets,
        )
        self.barge_in = Histogram(
            "chroma_call_barge_in_seconds", "Caller speech detected during a reply to the reply stopped",
            registry=self.registry, buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
        )
        self.call_underruns = Counter("chroma_call_underruns", "Reply audio that reached the caller after what was "
                                      "sent before it had played out (a gap)", registry=self.registry)
        # Every series a dashboard panel reads exists from the start, at 0.
        for protocol in ("realtime", "twilio", "telnyx"):
            self.calls_live.labels(protocol)
        for kind in ("turn", "call", "reply"):
            self.admission_wait.labels(kind)
        for reason in ("unauthorized", "tenant_concurrency_limit", "over_capacity", "stage_unavailable", "not_found"):
            self.calls_refused.labels(reason)
        for window in ("included", "excluded"):
            self.voice_to_voice.labels(window)
        for what in ("messages", "caller_audio"):
            self.history_dropped.labels(what)

    # The call engine's metrics (cluster.calls.metrics.CallMetrics).
    def observe_voice_to_voice(self, seconds: float, vad_window_s: float) -> None:
        self.voice_to_voice.labels("excluded").observe(seconds)
        self.voice_to_voice.labels("included").observe(seconds + vad_window_s)

    def observe_barge_in(self, seconds: float) -> None:
        self.barge_in.observe(seconds)

    def count_underrun(self) -> None:
        self.call_underruns.inc()
