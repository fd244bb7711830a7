"""Live calls multiplexed over the reply places: the call engine (`CallSession`) with the real admission control
(its Redis ledger on a real redis-server) and the real engines in one process (`LocalTurnBackend`, the tiny
RANDOM-WEIGHT checkpoint: the replies are noise, only their lifecycle is looked at)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import pytest_asyncio
import redis.asyncio
from prometheus_client import generate_latest

from cluster.admission.control import Admission
from cluster.api.metrics import ApiMetrics
from cluster.calls.events import CallError, ReplyAudio, ReplyFinished
from cluster.calls.session import CallSession
from cluster.pipeline.local import LocalTurnBackend
from cluster.settings import AppConfig
from cluster.settings.admission import AdmissionSettings
from cluster.settings.calls import CallSettings
from cluster.settings.state import StateSettings
from cluster.state.ledger import AdmissionLedger
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory
from model.testing.speech import synthetic_speech

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(redis_port):
    client = redis.asyncio.Redis(port=redis_port)
    yield StateStore(client, StateSettings(key_prefix=f"m{uuid.uuid4().hex[:8]}"))
    await client.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(tiny_checkpoint, store):
    """One reply place: one speech slot, one codec stream (slots alone bound it, whatever this machine's steps)."""
    backend = LocalTurnBackend.from_config(AppConfig(
        checkpoint={"path": str(tiny_checkpoint)}, reasoner={"engine": "hf"},
        speech={"max_slots": 1, "max_queue": 0, "max_step_rtf": None}, codec={"max_streams": 1, "max_step_rtf": None},
        turns={"max_frames": 8, "max_tokens": 16},
    ), state=store)
    yield backend
    await backend.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def voice_id(backend, store) -> str:
    transcript = "This is the voice of every reply."
    prompt = await backend.clone_voice(transcript, synthetic_speech(24000, 1.2, seed=4), 24000)
    voice = await store.create_voice("acme", "Ada", transcript, prompt.transcript_ids.tolist(), prompt.codes.numpy(),
                                     prompt.valid_frames)
    return voice.id


def admission_for(store, backend, metrics, **settings) -> Admission:
    ledger = AdmissionLedger(store.redis, store.settings.key_prefix)
    return Admission(ledger, backend.stages, TenantDirectory({}), AdmissionSettings(stage_poll_s=0.05, **settings),
                     metrics)


async def new_call(store, backend, metrics, admission, voice_id) -> CallSession:
    call = CallSession("acme", store, backend, backend.processor, CallSettings(), metrics, places=admission)
    await call.configure(voice_id=voice_id, instructions="Be brief.", turn_detection=None)
    return call


async def reply_of(call: CallSession, text: str | None = "Hello?") -> list:
    """Ask for a reply (to `text`, or to what is pending) and take the call's events until it finishes."""
    if text is not None:
        call.add_user_message(text, None)
    await call.create_response()
    seen = []
    async with asyncio.timeout(60):
        async for event in call.events():
            seen.append(event)
            if isinstance(event, ReplyFinished):
                return seen


async def test_two_calls_share_one_reply_place(store, backend, voice_id):
    """One place, two calls (the budget: 1 x 2). Both ask at once: one reply generates, the other waits in line for
    the place and gets it when the first has been generated, not when its call ends."""
    metrics = ApiMetrics()
    admission = admission_for(store, backend, metrics, call_oversubscription=2.0, reply_queue_s=30.0)
    try:
        tickets = [await admission.admit("acme", "call") for _ in range(2)]
        assert admission.capacity() == 1 and admission.call_budget() == 2
        calls = [await new_call(store, backend, metrics, admission, voice_id) for _ in range(2)]
        replies = await asyncio.gather(*(reply_of(call) for call in calls))
        for events in replies:
            assert events[-1].outcome == "completed" and any(isinstance(e, ReplyAudio) for e in events)
        text = _text(metrics)
        assert 'chroma_admissions_total{kind="reply",outcome="admitted"} 1.0' in text
        assert 'chroma_admissions_total{kind="reply",outcome="queued"} 1.0' in text  # it waited for the first
        for call in calls:
            await call.close()
        for ticket in tickets:
            await ticket.release()
        assert 0 < admission.reply_share() < 1
    finally:
        await admission.close()


async def test_a_reply_that_gets_no_place_fails_in_band_and_the_call_goes_on(store, backend, voice_id):
    """Another Ingress holds the one place (a ticket in the shared ledger). The call's reply waits its queue budget,
    fails with an in-band `over_capacity` error, and the caller's turn waits to be answered: once the place is free,
    the next response.create answers it."""
    metrics = ApiMetrics()
    admission = admission_for(store, backend, metrics, reply_queue_s=0.3)
    elsewhere = AdmissionLedger(store.redis, store.settings.key_prefix)
    try:
        call = await new_call(store, backend, metrics, admission, voice_id)
        await admission.refresh()
        assert await elsewhere.acquire("turn_elsewhere", "globex", "turn", 1, None, 15) == 0  # admitted there
        events = await reply_of(call)
        [error] = [e for e in events if isinstance(e, CallError)]
        assert error.code == "over_capacity" and "every reply place was busy" in error.message
        assert events[-1].outcome == "failed" and events[-1].reason == "over_capacity"
        assert not any(isinstance(e, ReplyAudio) for e in events)
        assert 'chroma_admissions_total{kind="reply",outcome="over_capacity"} 1.0' in _text(metrics)
        await elsewhere.release("turn_elsewhere", "globex", "turn")
        events = await reply_of(call, text=None)  # the same turn, answered now
        assert events[-1].outcome == "completed" and any(isinstance(e, ReplyAudio) for e in events)
        await call.close()
        assert await elsewhere.live("reply") == 0  # its place is free again
    finally:
        await admission.close()


def _text(metrics: ApiMetrics) -> str:
    return generate_latest(metrics.registry).decode()
