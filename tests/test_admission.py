"""Admission control against a real redis-server: the ledger shared by Ingress replicas, capacity from the stages,
tenant quotas, the time-bounded line, stages going down, leases of an Ingress that died. No model here."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio
from redis.exceptions import RedisError

from cluster.admission.control import Admission
from cluster.admission.stages import StageStatus
from cluster.api.errors import http_status
from cluster.api.metrics import ApiMetrics
from cluster.errors import TenantLimit
from cluster.settings.admission import AdmissionSettings
from cluster.settings.tenants import TenantQuota
from cluster.state.ledger import AdmissionLedger
from cluster.state.tenants import TenantDirectory
from model.engines.realtime import Headroom
from model.errors import CapacityError, StageUnavailable
from tests.conftest import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Stages:
    """What a backend reports: SpeechStack replicas of `slots` each, and whether the Reasoner answers."""

    def __init__(self, slots: int = 2, replicas: int = 1):
        self.slots, self.replicas, self.reasoner_problem = slots, replicas, ""

    async def read(self) -> list[StageStatus]:
        return [StageStatus.of("Reasoner", Headroom(None), problem=self.reasoner_problem),
                StageStatus.of("SpeechStack", Headroom(self.slots), self.replicas)]


@pytest.fixture
def ledger(redis_db) -> AdmissionLedger:
    return AdmissionLedger(redis_db, key_prefix=f"t{uuid.uuid4().hex[:8]}")  # a ledger of its own per test


def controller(ledger, stages: Stages, quotas: dict | None = None, **settings) -> Admission:
    tenants = TenantDirectory({}, {name: TenantQuota(**q) for name, q in (quotas or {}).items()})
    return Admission(ledger, stages.read, tenants, AdmissionSettings(stage_poll_s=0.05, **settings), ApiMetrics())


async def test_capacity_is_the_smallest_stage_and_refusals_come_at_once(ledger):
    admission = controller(ledger, Stages(slots=2))
    try:
        tickets = [await admission.admit("acme"), await admission.admit("acme")]
        assert admission.capacity() == 2 and await ledger.live() == 2
        with pytest.raises(CapacityError, match="at capacity") as refused:
            await admission.admit("acme")
        assert refused.value.code == "over_capacity"
        await tickets[0].release()
        await tickets[0].release()  # idempotent
        assert await ledger.live() == 1
        tickets.append(await admission.admit("acme"))
        for ticket in tickets:
            await ticket.release()
        assert await ledger.live() == 0 and admission.held() == 0
    finally:
        await admission.close()


async def test_ingress_replicas_share_one_ledger(ledger):
    stages = Stages(slots=3)
    first, second = controller(ledger, stages), controller(ledger, stages)
    try:
        held = [await first.admit("acme"), await second.admit("acme"), await first.admit("globex")]
        for admission in (first, second):
            with pytest.raises(CapacityError):
                await admission.admit("acme")
        await held[1].release()
        held.append(await first.admit("acme"))
        for ticket in held:
            await ticket.release()
    finally:
        await first.close()
        await second.close()


async def test_autoscaled_replicas_add_capacity(ledger):
    stages = Stages(slots=2, replicas=1)
    admission = controller(ledger, stages)
    try:
        held = [await admission.admit("acme") for _ in range(2)]
        with pytest.raises(CapacityError):
            await admission.admit("acme")
        stages.replicas = 2
        await admission.refresh()
        assert admission.capacity() == 4
        held += [await admission.admit("acme") for _ in range(2)]
        stages.replicas = 1  # scaled down with four live: none is cut off, new ones wait for room
        await admission.refresh()
        with pytest.raises(CapacityError):
            await admission.admit("acme")
        for ticket in held:
            await ticket.release()
    finally:
        await admission.close()


async def test_tenant_quotas_per_kind(ledger):
    admission = controller(ledger, Stages(slots=10), {"acme": {"max_turns": 1, "max_calls": 1}})
    try:
        turn = await admission.admit("acme", "turn")
        with pytest.raises(TenantLimit, match="acme") as refused:
            await admission.admit("acme", "turn")
        assert http_status(refused.value) == 429 and refused.value.code == "tenant_concurrency_limit"
        call = await admission.admit("acme", "call")  # calls have their own quota
        with pytest.raises(TenantLimit):
            await admission.admit("acme", "call")
        others = [await admission.admit("globex") for _ in range(3)]  # no quota of its own: the default, unbounded
        assert await ledger.live() == 5
        async with turn:
            pass
        async with await admission.admit("acme", "turn"):
            pass
        for ticket in [call, *others]:
            await ticket.release()
        assert await ledger.live() == 0
    finally:
        await admission.close()


async def test_calls_are_multiplexed_over_the_reply_places(ledger):
    """Two reply places, oversubscribed 2x: four live calls. A call holds no reply place until a reply of it is
    generated; a reply finding every place busy waits for one within its queue budget, and is refused past it."""
    admission = controller(ledger, Stages(slots=2), call_oversubscription=2.0, reply_queue_s=0.5)
    try:
        calls = [await admission.admit("acme", "call") for _ in range(4)]
        assert admission.call_budget() == 4 and await ledger.live("call") == 4 and await ledger.live("reply") == 0
        started = time.monotonic()
        with pytest.raises(CapacityError, match="as many live calls") as refused:
            await admission.admit("acme", "call")
        assert refused.value.code == "over_capacity" and time.monotonic() - started < 0.2  # at once, no line
        turn = await admission.admit("acme", "turn")  # HTTP turns and replies share the places
        reply = await admission.admit("acme", "reply")
        waiting = asyncio.create_task(admission.admit("acme", "reply"))
        await asyncio.sleep(0.2)
        assert not waiting.done() and admission.in_line() == 1
        await turn.release()  # a place frees up within the budget: the waiting reply gets it
        second = await asyncio.wait_for(waiting, 1)
        assert 0.15 < second.queued_s < 0.5
        started = time.monotonic()
        with pytest.raises(CapacityError, match="every reply place was busy"):
            await admission.admit("acme", "reply")
        assert 0.5 <= time.monotonic() - started < 1.0  # waited out its budget, no more
        for ticket in (reply, second):
            await ticket.release()
        assert admission.reply_share() is None  # no call has ended yet
        for call in calls:
            await call.release()
        assert 0 < admission.reply_share() < 1  # two replies' time over four calls' (the turn is not a call's)
        assert await ledger.live() == 0 and admission.held() == 0
    finally:
        await admission.close()


async def test_a_stage_that_is_down_refuses_new_turns_and_stops_unstarted_ones(ledger):
    stages = Stages(slots=4)
    admission = controller(ledger, stages)
    try:
        started, waiting = await admission.admit("acme"), await admission.admit("acme")
        started.started()
        stages.reasoner_problem = "no replica answers"
        await admission.refresh()
        assert waiting.stage_down.is_set() and not started.stage_down.is_set()
        with pytest.raises(StageUnavailable, match="Reasoner") as refused:
            await admission.admit("acme")
        assert refused.value.code == "stage_unavailable"
        stages.reasoner_problem = ""
        await admission.refresh()
        await (await admission.admit("acme")).release()

        # A replica that died under a live turn: down at once, and until a reading that starts after it.
        unstarted = await admission.admit("acme")
        admission.stage_failed("SpeechStack")
        assert unstarted.stage_down.is_set()
        with pytest.raises(StageUnavailable, match="SpeechStack"):
            await admission.admit("acme")
        await admission.refresh()
        await (await admission.admit("acme")).release()
        for ticket in (started, waiting, unstarted):
            await ticket.release()
    finally:
        await admission.close()


async def learn(admission: Admission, hold_s: float, ttfa_s: float) -> None:
    """A few turns so that the line knows how long places are held and how soon audio starts."""
    for _ in range(3):
        ticket = await admission.admit("warmup")
        ticket.first_audio(ttfa_s)
        await asyncio.sleep(hold_s)
        await ticket.release()


async def test_the_line_is_bounded_by_the_time_to_first_audio_budget(ledger):
    admission = controller(ledger, Stages(slots=2), ttfa_budget_s=1.0)
    try:
        await learn(admission, hold_s=0.2, ttfa_s=0.3)  # a place frees every 0.1 s on average; 0.7 s to wait
        held = [await admission.admit("acme") for _ in range(2)]
        waiter = asyncio.create_task(admission.admit("acme"))
        while admission.in_line() < 1:
            await asyncio.sleep(0.01)
        assert not waiter.done()  # in line, not refused
        await held[0].release()
        queued = await asyncio.wait_for(waiter, 1.0)
        assert queued.queued_s > 0
        held[0] = queued

        # Nothing frees up: the wait ends when its share of the budget is spent, with a refusal.
        with pytest.raises(CapacityError):
            await asyncio.wait_for(admission.admit("acme"), 2.0)
        for ticket in held:
            await ticket.release()
    finally:
        await admission.close()


async def test_a_line_longer_than_the_budget_is_refused_at_once(ledger):
    admission = controller(ledger, Stages(slots=2), ttfa_budget_s=1.0)
    try:
        await learn(admission, hold_s=0.5, ttfa_s=0.3)  # a place every 0.25 s ... but the audio takes 0.3 s
        held = [await admission.admit("acme") for _ in range(2)]
        waiters = [asyncio.create_task(admission.admit("acme")) for _ in range(2)]
        while admission.in_line() < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(CapacityError):  # third in line: 0.75 s of wait > the 0.7 s left of the budget
            await asyncio.wait_for(admission.admit("acme"), 0.5)  # refused before its 0.7 s could run out
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        for ticket in held:
            await ticket.release()
    finally:
        await admission.close()


async def test_an_ingress_that_dies_leaves_leases_that_run_out(ledger):
    stages = Stages(slots=1)
    dead, alive = controller(ledger, stages, lease_s=1.0), controller(ledger, stages, lease_s=1.0)
    try:
        await dead.admit("acme")
        await dead.close()  # no release, no renewal
        with pytest.raises(CapacityError):
            await alive.admit("acme")
        for _ in range(40):
            await asyncio.sleep(0.1)
            try:
                ticket = await alive.admit("acme")
                break
            except CapacityError:
                continue
        else:
            pytest.fail("the dead Ingress's lease never ran out")
        await asyncio.sleep(1.2)  # the live Ingress renews its own lease
        assert await ledger.live() == 1
        await ticket.release()
    finally:
        await alive.close()


async def test_with_redis_away_admission_fails_as_a_redis_error():
    client = redis.asyncio.Redis(port=free_port())
    admission = controller(AdmissionLedger(client), Stages())
    try:
        with pytest.raises(RedisError):  # the API answers it 503 state_unavailable
            await admission.admit("acme")
    finally:
        await admission.close()
        await client.aclose()
