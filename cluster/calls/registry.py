"""Live calls of one Ingress replica: admitted or refused once, at the handshake."""

from __future__ import annotations

from collections import Counter

from cluster.api.metrics import ApiMetrics
from cluster.calls.settings import CallSettings
from model.errors import CapacityError, QuotaExceeded


class LiveCalls:
    def __init__(self, settings: CallSettings, metrics: ApiMetrics):
        self.settings, self.metrics = settings, metrics
        self.by_tenant: Counter[str] = Counter()

    @property
    def live(self) -> int:
        return sum(self.by_tenant.values())

    def admit(self, tenant: str, protocol: str) -> CallTicket:
        """A ticket for one call (release it when the call ends); CapacityError / QuotaExceeded when full."""
        if self.live >= self.settings.max_live_calls:
            self.metrics.calls_refused.labels("over_capacity").inc()
            raise CapacityError(f"no free call capacity: {self.live} live calls, the limit is "
                                f"{self.settings.max_live_calls}; retry shortly")
        if self.by_tenant[tenant] >= self.settings.max_calls_per_tenant:
            self.metrics.calls_refused.labels("tenant_concurrency_limit").inc()
            raise QuotaExceeded(f"this tenant has {self.by_tenant[tenant]} live calls, its limit")
        self.by_tenant[tenant] += 1
        self.metrics.calls_live.labels(protocol).inc()
        return CallTicket(self, tenant, protocol)


class CallTicket:
    def __init__(self, calls: LiveCalls, tenant: str, protocol: str):
        self.calls, self.tenant, self.protocol = calls, tenant, protocol
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.calls.by_tenant[self.tenant] -= 1
            self.calls.metrics.calls_live.labels(self.protocol).dec()
