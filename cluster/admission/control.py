"""Admission control: a turn (or a live call) is admitted only if the cluster can serve it in real time. It is
admitted or refused once, at its start, and never slowed down later.

- **Capacity** is the smallest stage's: across each stage's live replicas, the turns each engine keeps real-time
  by its own measured step times (at most its slots; `model.engines.realtime`), as the backend reports them
  (`TurnBackend.stages`, read every `stage_poll_s`). Replicas that autoscaling adds add capacity as soon as they
  answer, and capacity shrinks when contention makes the steps slower, before the live turns fall behind.
- **The count of live turns and calls** is the Redis ledger (`cluster.state.ledger`), shared by every Ingress
  replica; the tenant's quota (`TenantQuota`) is checked in the same atomic step: over it, 429.
- **At capacity a turn may wait, but only as long as it can still hear its first audio within
  `ttfa_budget_s`**: it joins the line if the expected wait for its place (how long tickets are held, over the
  capacity, times its place) plus the usual time to first audio fits the budget, and is refused at once (503
  over_capacity) otherwise. The line is bounded by time, not by a count; one that waits past its share of the
  budget is refused then.
- **A stage that is not ready** (no live replica, failing its probe, or it just failed a live turn) refuses new
  turns at once (503 stage_unavailable) until the backend reports it ready again. Turns admitted but not started
  when it goes down are stopped too, instead of waiting for the replica to come back.

Live calls are **multiplexed over the reply places**: a caller spends much of a call talking or silent, and the
stages work only while a reply is generated.
- A call is admitted against the **call budget**, the reply capacity times `call_oversubscription`:
  `ticket = await admission.admit(tenant, "call")` when it is accepted, `ticket.started()` once it is set up,
  `await ticket.release()` when it ends (or `async with ticket:`).
- Each of its replies takes a reply place only while it is generated: `await admission.admit(tenant, "reply")`.
  When every place is busy, the reply waits in the same line as turns, up to `reply_queue_s` (the wait is part of
  the caller's voice-to-voice latency), and is refused after that (the call gets an in-band error and goes on).
- The share of call time their replies spend generating is measured (`reply_share`) and reported beside the
  budget, to size `call_oversubscription` by: callers who talk half the time leave a reply place busy about a
  quarter of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from cluster.admission.stages import StageStatus
from cluster.errors import TenantLimit
from cluster.settings.admission import AdmissionSettings
from cluster.settings.tenants import Kind
from cluster.state.ledger import AdmissionLedger, Verdict
from cluster.state.tenants import TenantDirectory
from model.engines.realtime import Headroom
from model.errors import CapacityError, ChromaError, StageFailed, StageUnavailable

log = logging.getLogger(__name__)

UNBOUNDED = 2**31 - 1  # the ledger's capacity when no stage sets one
_LINE_POLL_S = 0.05  # a waiting turn also looks again this often: other Ingress replicas release without telling us


class AdmissionMetrics(Protocol):
    """The gauges and counters admission control keeps (`cluster.api.metrics.ApiMetrics` has them)."""

    capacity: Gauge
    call_budget: Gauge
    reply_places_busy: Gauge
    call_reply_share: Gauge
    queued: Gauge
    admissions: Counter
    admission_wait: Histogram


class _Average:
    """Exponentially weighted mean of recent samples (None before the first)."""

    def __init__(self, weight: float = 0.2):
        self.weight, self.value = weight, None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)


class Ticket:
    """An admitted turn's or call's place in the cluster. Release it when the turn or call ends (idempotent)."""

    def __init__(self, admission: Admission, tenant: str, kind: Kind):
        self.admission, self.tenant, self.kind = admission, tenant, kind
        self.id = f"{kind}_{uuid.uuid4().hex}"
        self.queued_s = 0.0
        self.admitted_at: float | None = None
        self.is_started = False
        self.stage_down = asyncio.Event()  # set when a stage goes down before the turn started
        self._released = False

    def started(self) -> None:
        """The reply (or the call) is under way: from now on a stage failure shows in its own stream."""
        self.is_started = True

    def first_audio(self, ttfa_s: float) -> None:
        """Time to first audio as the API measured it; the line's estimate learns from it."""
        self.admission._ttfa.add(max(ttfa_s - self.queued_s, 0.0))

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        await self.admission._release(self)

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.release()


class Admission:
    def __init__(
        self, ledger: AdmissionLedger, read_stages: Callable[[], Awaitable[list[StageStatus]]],
        tenants: TenantDirectory, settings: AdmissionSettings, metrics: AdmissionMetrics,
    ):
        self.ledger, self._read_stages, self.tenants = ledger, read_stages, tenants
        self.settings, self.metrics = settings, metrics
        self._stages: dict[str, StageStatus] | None = None
        self._failed_at: dict[str, float] = {}  # stage -> when it failed a live turn
        self._held: dict[str, Ticket] = {}
        self._line: deque[object] = deque()
        self._released = asyncio.Event()  # replaced on every release: waiters wait on the one they saw
        self._poll_now = asyncio.Event()
        self._hold = _Average()  # seconds a reply place is held
        self._call_s = self._reply_s = 0.0  # ended calls' seconds, and their replies' seconds in reply places
        self._ttfa = _Average()  # seconds to first audio, not counting time in line
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start polling the stages and renewing leases (idempotent; admit() starts it when needed)."""
        if not self._tasks or any(t.done() for t in self._tasks):
            for task in self._tasks:
                task.cancel()
            self._tasks = [asyncio.create_task(self._poll(), name="admission-poll"),
                           asyncio.create_task(self._renew(), name="admission-renew")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # ---- stages ----------------------------------------------------------------------------------------------
    async def stages(self) -> list[StageStatus]:
        """Every stage as last read (read now the first time)."""
        self.start()
        if self._stages is None:
            await self.refresh()
        return list(self._stages.values())

    def capacity(self) -> int | None:
        """Reply places: turns and calls' replies generated at once, the smallest stage's (None: no stage sets a
        bound)."""
        bounds = [s.capacity for s in (self._stages or {}).values() if s.capacity is not None]
        return min(bounds) if bounds else None

    def call_budget(self) -> int | None:
        """Live calls the cluster holds at once: its reply places, oversubscribed."""
        capacity = self.capacity()
        return None if capacity is None else int(capacity * self.settings.call_oversubscription)

    def reply_share(self) -> float | None:
        """Of the ended calls' time here, the share their replies held a reply place (None before one ended)."""
        return self._reply_s / self._call_s if self._call_s else None

    async def refresh(self) -> None:
        started = time.monotonic()
        try:
            statuses = await self._read_stages()
        except Exception:
            log.exception("reading the stages' status failed")
            names = list(self._stages or {}) or ["backend"]
            statuses = [StageStatus.of(name, Headroom(None), 0, "status unknown") for name in names]
        stages = {}
        for status in statuses:
            failed_at = self._failed_at.get(status.name)
            if failed_at is not None and status.ready:
                if failed_at < started:  # this reading began after the failure: it is ready again
                    del self._failed_at[status.name]
                else:
                    status = status.down("failed a live turn")
            stages[status.name] = status
        self._stages = stages
        self._report_capacity()
        if any(not s.ready for s in stages.values()):
            self._stop_unstarted()

    def stage_failed(self, stage: str) -> None:
        """A stage died or failed during a live turn: take it as down until a reading that starts after now."""
        self._failed_at[stage] = time.monotonic()
        if self._stages is not None and stage in self._stages:
            self._stages[stage] = self._stages[stage].down("failed a live turn")
            self._report_capacity()
        self._stop_unstarted()
        self._poll_now.set()

    def note_failure(self, error: BaseException) -> None:
        """A turn's or a call's reply failed with `error`: a replica that died under it takes its stage out of
        admission until it answers again, so the next turn is refused at once rather than sent to it."""
        if isinstance(error, StageFailed) and error.died:
            self.stage_failed(error.stage)

    def _report_capacity(self) -> None:
        self.metrics.capacity.set(self.capacity() or 0)
        self.metrics.call_budget.set(self.call_budget() or 0)

    def _stop_unstarted(self) -> None:
        for ticket in self._held.values():
            if not ticket.is_started:
                ticket.stage_down.set()

    def check_stages(self) -> None:
        """StageUnavailable naming every stage that is not ready, if any."""
        down = [s for s in (self._stages or {}).values() if not s.ready]
        if down:
            names = ", ".join(f"{s.name} ({s.problem})" if s.problem else s.name for s in down)
            raise StageUnavailable(f"not ready: {names}; retry shortly")

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            self._poll_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), self.settings.stage_poll_s)

    # ---- admission -------------------------------------------------------------------------------------------
    async def admit(self, tenant: str, kind: Kind = "turn") -> Ticket:
        """A ticket for one turn, call or call's reply of `tenant`, or TenantLimit (429), CapacityError or
        StageUnavailable (503), RedisError when the ledger is away."""
        arrived = time.monotonic()
        ticket = Ticket(self, tenant, kind)
        try:
            await self.stages()
            self.check_stages()
            if (kind == "call" or not self._line) and await self._acquire(ticket):
                return self._admitted(ticket, arrived, "admitted")
            allowance = None if kind == "call" else (
                self.settings.reply_queue_s if kind == "reply" else self._line_allowance(len(self._line) + 1))
            if allowance is None:
                raise self._over_capacity(kind)
            return await self._wait_in_line(ticket, arrived, arrived + allowance)
        except ChromaError as refusal:
            self.metrics.admissions.labels(kind, refusal.code).inc()
            raise

    def _line_allowance(self, place: int) -> float | None:
        """How long a turn at `place` in line may wait for capacity, or None when it should be refused at once."""
        capacity, hold, ttfa = self.capacity(), self._hold.value, self._ttfa.value
        if not capacity or hold is None or ttfa is None:
            return None  # nothing known yet about how soon a place frees up
        allowance = self.settings.ttfa_budget_s - ttfa
        if allowance <= 0 or place * hold / capacity > allowance:
            return None
        return allowance

    async def _wait_in_line(self, ticket: Ticket, arrived: float, deadline: float) -> Ticket:
        place = object()
        self._line.append(place)
        self.metrics.queued.inc()
        try:
            while True:
                released = self._released
                if self._line[0] is place:
                    self.check_stages()
                    if await self._acquire(ticket):
                        return self._admitted(ticket, arrived, "queued")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._over_capacity(ticket.kind)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), min(remaining, _LINE_POLL_S))
        finally:
            self._line.remove(place)
            self.metrics.queued.dec()
            self._wake_line()

    async def _acquire(self, ticket: Ticket) -> bool:
        limit = self.tenants.quota(ticket.tenant).limit(ticket.kind)
        bound = self.call_budget() if ticket.kind == "call" else self.capacity()
        try:
            verdict = await self.ledger.acquire(
                ticket.id, ticket.tenant, ticket.kind, bound or UNBOUNDED, limit, self.settings.lease_s
            )
        except asyncio.CancelledError:  # the script may have run: take the ticket back out
            asyncio.get_running_loop().create_task(self._forget(ticket))
            raise
        if verdict is Verdict.TENANT_LIMIT:
            raise TenantLimit(
                f"tenant {ticket.tenant!r} already has {limit} live {ticket.kind}s, as many as its quota allows"
            )
        return verdict is Verdict.ADMITTED

    def _admitted(self, ticket: Ticket, arrived: float, outcome: str) -> Ticket:
        ticket.admitted_at = time.monotonic()
        ticket.queued_s = ticket.admitted_at - arrived
        self._held[ticket.id] = ticket
        self.metrics.admissions.labels(ticket.kind, outcome).inc()
        self.metrics.admission_wait.labels(ticket.kind).observe(ticket.queued_s)
        self._count_places()
        return ticket

    def _over_capacity(self, kind: Kind) -> CapacityError:
        if kind == "call":
            return CapacityError(f"the cluster holds as many live calls as it serves ({self.call_budget()}); retry "
                                 "shortly")
        if kind == "reply":
            return CapacityError(f"every reply place was busy for {self.settings.reply_queue_s:g} s; the call goes "
                                 "on: speak again, or send response.create")
        return CapacityError(f"the cluster is at capacity ({self.capacity()} turns and replies at once); retry shortly")

    async def _release(self, ticket: Ticket) -> None:
        if self._held.pop(ticket.id, None) is not None:
            held = time.monotonic() - ticket.admitted_at
            if ticket.kind == "call":
                self._call_s += held
                self.metrics.call_reply_share.set(self.reply_share())
            else:
                self._hold.add(held)
                self._reply_s += held if ticket.kind == "reply" else 0.0
            self._count_places()
        await self._forget(ticket)
        self._wake_line()

    def _count_places(self) -> None:
        self.metrics.reply_places_busy.set(sum(t.kind != "call" for t in self._held.values()))

    async def _forget(self, ticket: Ticket) -> None:
        try:
            await self.ledger.release(ticket.id, ticket.tenant, ticket.kind)
        except RedisError as error:  # its lease runs out instead
            log.warning("releasing %s failed (%r): its lease runs out in %.0f s", ticket.id, error, self.settings.lease_s)

    def _wake_line(self) -> None:
        self._released.set()
        self._released = asyncio.Event()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            held = [(t.id, t.tenant, t.kind) for t in self._held.values()]
            try:
                await self.ledger.renew(held, self.settings.lease_s)
            except RedisError as error:
                log.warning("renewing %d admission leases failed: %r", len(held), error)

    def held(self) -> int:
        """Tickets this Ingress holds now."""
        return len(self._held)

    def in_line(self) -> int:
        """Turns waiting here for capacity now."""
        return len(self._line)
