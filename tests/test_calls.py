"""Live-call limits on the real app served by uvicorn, with a real redis-server; the engines are not needed for
these (a backend that never answers stands in for them: no reply is ever started here)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import redis.asyncio
import uvicorn
import websockets

from cluster.admission.stages import StageStatus
from cluster.api.app import build_api
from cluster.api.metrics import ApiMetrics
from cluster.calls.cursor import PlaybackCursor
from cluster.calls.events import TranscriptionCompleted, TranscriptionDelta, TranscriptionFailed
from cluster.calls.reply import Reply, ReplyState, UserInput
from cluster.calls.session import CallSession
from cluster.clients.http import TurnReply, playback_gaps
from cluster.clients.realtime import ReplyPlayback
from cluster.pipeline.history import HistoryPolicy
from cluster.settings.admission import AdmissionSettings
from cluster.settings.calls import CallSettings
from cluster.settings.state import StateSettings
from cluster.settings.turns import HistorySettings
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory
from model.engines.realtime import Headroom
from model.errors import StageFailed
from model.processing.audio import encode_wav
from model.processing.processor import ChromaProcessor
from model.reasoner.base import ReasonerError
from tests.conftest import free_port

KEYS = {"key-acme": "acme"}


class SilentBackend:
    """Room for two reply places (so four live calls, at the default oversubscription of 2), and never a reply."""

    processor = None
    history = HistoryPolicy(None, 4096, 64, None, HistorySettings())

    async def stages(self):
        return [StageStatus.of("SpeechStack", Headroom(2))]


@pytest.fixture(scope="module")
def server(redis_port):
    """The app on a free port, in a thread: idle timeout 1 s, calls of at most 3 s, room for four calls."""
    store = StateStore(redis.asyncio.Redis(port=redis_port), StateSettings(key_prefix=f"c{uuid.uuid4().hex[:8]}"))
    settings = CallSettings(idle_timeout_s=1.0, max_call_s=3.0)
    yield from serving(build_api(store, TenantDirectory(KEYS), SilentBackend(), call_settings=settings))


def serving(app):
    """Serve `app` with uvicorn on a free port, in a thread, while the generator is suspended."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"ws://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


async def events_until_closed(ws) -> list[dict]:
    events = []
    try:
        async for message in ws:
            events.append(json.loads(message))
    except websockets.ConnectionClosed:
        pass
    return events


async def test_an_idle_call_is_told_and_closed(server):
    async with websockets.connect(f"{server}/v1/realtime", additional_headers={"Authorization": "Bearer key-acme"}) as ws:
        started = time.monotonic()
        events = await asyncio.wait_for(events_until_closed(ws), 10)
    assert [e["type"] for e in events] == ["session.created", "error"]
    assert events[-1]["error"]["code"] == "idle_timeout" and time.monotonic() - started < 5


async def test_a_browser_sends_the_key_as_a_subprotocol_and_a_wrong_one_is_refused(server):
    """Browsers cannot set headers on a WebSocket: the key comes as `openai-insecure-api-key.<key>` beside
    `realtime`, as OpenAI takes it, and the socket is accepted with `realtime`."""
    offered = ["realtime", "openai-insecure-api-key.key-acme"]
    async with websockets.connect(f"{server}/v1/realtime", subprotocols=offered) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.created"
    refusals = [
        {"subprotocols": ["realtime", "openai-insecure-api-key.key-wrong"]},
        {"subprotocols": ["realtime", "openai-insecure-api-key."]},
        {"subprotocols": ["realtime"]},
        # The header, where there is one, is the key: a right key offered beside a wrong header is not looked at.
        {"subprotocols": offered, "additional_headers": {"Authorization": "Bearer key-wrong"}},
    ]
    for how in refusals:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(f"{server}/v1/realtime", **how)
        assert refused.value.response.status_code == 401, how
        assert json.loads(refused.value.response.body)["error"]["code"] == "unauthorized", how


async def test_a_call_longer_than_the_limit_is_ended(server):
    async with websockets.connect(f"{server}/v1/realtime", additional_headers={"Authorization": "Bearer key-acme"}) as ws:
        async def keep_talking():
            while True:  # messages keep the call from going idle
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                await asyncio.sleep(0.3)

        talking = asyncio.create_task(keep_talking())
        events = await asyncio.wait_for(events_until_closed(ws), 10)
        talking.cancel()
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "call_too_long"


async def test_with_no_call_capacity_left_calls_are_refused_at_once(server):
    headers = {"Authorization": "Bearer key-acme"}
    calls = [await websockets.connect(f"{server}/v1/realtime", additional_headers=headers) for _ in range(4)]
    try:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(f"{server}/v1/realtime", additional_headers=headers)
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "1"
        assert json.loads(refused.value.response.body)["error"]["code"] == "over_capacity"
        async with websockets.connect(f"{server}/v1/telephony/twilio") as phone:  # refused once it says who calls
            await phone.send(json.dumps({"event": "start", "streamSid": "MZ1", "start": {
                "customParameters": {"api_key": "key-acme"}}}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(phone.recv(), 10)
            assert closed.value.rcvd.code == 1013 and closed.value.rcvd.reason == "over_capacity"
    finally:
        for ws in calls:
            await ws.close()


class DyingBackend(SilentBackend):
    """Its Codec replica dies under the first reply; after that nothing answers, and a reading of the stages says
    so (the admission's next poll is a minute away)."""

    def __init__(self, processor: ChromaProcessor):
        self.replies = 0
        self.history = HistoryPolicy(processor, 4096, 64, None, HistorySettings())  # its reply is planned first

    async def stages(self):
        return [StageStatus.of("Codec", Headroom(4)) if not self.replies else StageStatus.of("Codec", Headroom(None), 0, "no replica answers")]

    async def run_turn(self, *args):
        self.replies += 1
        if self.replies == 1:
            raise StageFailed("Codec", died=True)
        await asyncio.Event().wait()
        yield  # pragma: no cover


async def test_a_stage_that_died_under_a_call_refuses_the_next_turn_at_once(redis_port, tiny_checkpoint):
    """Seen in `make chart-test`: a node died under two live calls, yet the next HTTP turn was admitted and waited
    for the dead Codec until the stages' next reading. A call's failed reply takes its stage out of admission, as a
    turn's does."""
    state = StateSettings(key_prefix=f"c{uuid.uuid4().hex[:8]}")
    store = StateStore(redis.asyncio.Redis(port=redis_port), state)  # this loop's; the app gets its own client
    app = build_api(StateStore(redis.asyncio.Redis(port=redis_port), state), TenantDirectory(KEYS), DyingBackend(ChromaProcessor.from_pretrained(tiny_checkpoint)),
                    admission=AdmissionSettings(stage_poll_s=60, start_timeout_s=1.0))  # no reading catches up
    server = serving(app)
    url = next(server)
    try:
        async with httpx.AsyncClient(base_url=url.replace("ws://", "http://"), headers={"Authorization": "Bearer key-acme"}) as http:
            voice = await store.create_voice("acme", "Ada", "Hi.", [1, 2], np.ones((4, 8), np.int64), 4)
            async with websockets.connect(f"{url}/v1/realtime", additional_headers={"Authorization": "Bearer key-acme"}) as ws:
                await ws.send(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "audio": {"output": {"voice": voice.id}}}}))
                await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}}))
                await ws.send(json.dumps({"type": "response.create"}))
                while (event := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "response.done":
                    pass
            assert event["response"]["status_details"]["error"]["code"] == "stage_failed"
            session = (await http.post("/v1/sessions", json={"voice_id": voice.id})).json()
            refused = await http.post(f"/v1/sessions/{session['id']}/turns", content=encode_wav(np.zeros(8000, np.float32), 16000),
                                      headers={"Content-Type": "audio/wav"})
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "stage_unavailable" and "not ready: Codec" in error["message"]  # not sent to it
    finally:
        next(server, None)


def test_the_realtime_event_parser_never_crashes_or_hangs(server):
    """hypothesis drives /v1/realtime with arbitrary messages and malformed events: each gets an answer or an error
    event, the connection stays up (a probe is answered after them), and no error carries internals."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)
    kinds = st.sampled_from(["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                             "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
                             "response.create", "response.cancel", "conversation.item.delete"]) | st.text(max_size=12)
    events = st.builds(lambda kind, fields: json.dumps({"type": kind, **fields}), kinds,
                       st.dictionaries(st.sampled_from(["session", "audio", "item", "item_id", "audio_end_ms",
                                                        "response_id", "event_id", "content_index"]), values, max_size=4))
    messages = st.lists(events | st.text(max_size=60) | st.binary(max_size=40), min_size=1, max_size=8)

    async def exchange(batch):
        async with websockets.connect(f"{server}/v1/realtime", additional_headers={"Authorization": "Bearer key-acme"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            for message in batch:
                await ws.send(message)
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "probe"}}))
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if event["type"] == "error":
                    assert event["error"]["code"] not in ("server_error", None)  # handled as the client's mistake
                    assert event["error"]["message"]
                    assert "Traceback" not in event["error"]["message"] and ".py" not in event["error"]["message"]
                elif event["type"] == "session.updated" and event["session"]["instructions"] == "probe":
                    return

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages)
    def run(batch):
        asyncio.run(exchange(batch))

    run()


@pytest.mark.asyncio(loop_scope="session")  # the loop of the redis_db client
async def test_a_barge_in_and_a_truncate_settling_one_reply_commit_it_once(redis_db, tiny_checkpoint):
    """Seen on the live cluster: a barge-in's commit and the client's truncate settled the same reply at once, and
    the second append found the session a version ahead (an error event version_conflict)."""
    store = StateStore(redis_db, StateSettings(key_prefix=f"c{uuid.uuid4().hex[:8]}"))
    voice = await store.create_voice("acme", "Ada", "Hi.", [1, 2], np.ones((4, 8), np.int64), 4)
    call = CallSession("acme", store, SilentBackend(), ChromaProcessor.from_pretrained(tiny_checkpoint),
                       CallSettings(), ApiMetrics())
    await call.configure(voice_id=voice.id)
    reply = Reply(id="resp_1", item_id="item_2", user=UserInput("item_1", audio=np.zeros(1600, np.float32)),
                  cursor=PlaybackCursor(), committed_at=None, vad_window_s=0.0, state=ReplyState.INTERRUPTED,
                  outcome="cancelled")
    reply.cursor.report_played(0)  # the truncate: the caller heard none of it
    await asyncio.gather(call._settle(reply), call._settle(reply))
    session = await store.get_session("acme", call.session.id)
    assert (session.version, [m.role for m in session.history]) == (1, ["user", "assistant"])
    assert call.queue.empty(), call.queue.get_nowait()  # no error event


class TranscribingBackend(SilentBackend):
    """Its input transcription waits for `release`, then says two words or fails with `fail`."""

    def __init__(self, fail: Exception | None = None):
        self.fail, self.release = fail, asyncio.Event()

    async def transcribe(self, audio: bytes):
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        yield "Hello"
        yield " there."


def drained(call: CallSession) -> list:
    events = []
    while not call.queue.empty():
        events.append(call.queue.get_nowait())
    return events


@pytest.mark.parametrize("finished_first", ["transcription", "commit"])
async def test_a_transcript_joins_its_history_entry_whichever_finishes_first(redis_port, tiny_checkpoint, finished_first):
    """Input transcription runs beside the reply: it may finish before the turn commits or after; either way the
    transcript lands on the user message, and the Reasoner's text of it stays untouched."""
    store = StateStore(redis.asyncio.Redis(port=redis_port), StateSettings(key_prefix=f"c{uuid.uuid4().hex[:8]}"))
    voice = await store.create_voice("acme", "Ada", "Hi.", [1, 2], np.ones((4, 8), np.int64), 4)
    backend = TranscribingBackend()
    call = CallSession("acme", store, backend, ChromaProcessor.from_pretrained(tiny_checkpoint), CallSettings(),
                       ApiMetrics())
    await call.configure(voice_id=voice.id, transcription=True)
    user = UserInput("item_1", audio=np.zeros(1600, np.float32))
    call._commit(user)
    reply = Reply(id="resp_1", item_id="item_2", user=user, cursor=PlaybackCursor(), committed_at=None,
                  vad_window_s=0.0, state=ReplyState.INTERRUPTED, outcome="cancelled")
    reply.cursor.report_played(0)
    if finished_first == "transcription":
        backend.release.set()
        while not any(isinstance(e, TranscriptionCompleted) for e in list(call.queue._queue)):
            await asyncio.sleep(0.01)
        await call._settle(reply)
    else:
        await call._settle(reply)
        backend.release.set()
        while call.transcripts or not any(isinstance(e, TranscriptionCompleted) for e in list(call.queue._queue)):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # its write to the store
    events = [e for e in drained(call) if isinstance(e, TranscriptionDelta | TranscriptionCompleted)]
    assert events == [TranscriptionDelta("item_1", "Hello"), TranscriptionDelta("item_1", " there."),
                      TranscriptionCompleted("item_1", "Hello there.", 0.1)]
    session = await store.get_session("acme", call.session.id)
    assert [(m.id, m.text, m.transcript) for m in session.history] == [("item_1", None, "Hello there."),
                                                                        ("item_2", "", None)]
    assert call.transcripts == {}
    await call.close()
    await store.redis.aclose()


async def test_a_failed_transcription_says_why_and_the_call_goes_on(redis_port, tiny_checkpoint):
    store = StateStore(redis.asyncio.Redis(port=redis_port), StateSettings(key_prefix=f"c{uuid.uuid4().hex[:8]}"))
    voice = await store.create_voice("acme", "Ada", "Hi.", [1, 2], np.ones((4, 8), np.int64), 4)
    backend = TranscribingBackend(fail=ReasonerError("conversation takes 9000 positions", code="context_full"))
    call = CallSession("acme", store, backend, ChromaProcessor.from_pretrained(tiny_checkpoint), CallSettings(),
                       ApiMetrics())
    await call.configure(voice_id=voice.id, transcription=True)
    call._commit(UserInput("item_1", audio=np.zeros(1600, np.float32)))
    backend.release.set()
    while not any(isinstance(e, TranscriptionFailed) for e in list(call.queue._queue)):
        await asyncio.sleep(0.01)
    failed = next(e for e in drained(call) if isinstance(e, TranscriptionFailed))
    assert failed == TranscriptionFailed("item_1", "context_full", "conversation takes 9000 positions")
    assert call.transcripts == {} and call.pending is not None  # the turn still waits for its reply
    await call.close()
    await store.redis.aclose()


def test_playback_gaps_on_a_real_time_clock():
    """The client-side player both benchmarks use: 160 ms chunks, played as they arrive."""
    chunks = [(1.0, 0.16), (1.1, 0.16), (1.5, 0.16), (1.55, 0.16)]
    assert playback_gaps(chunks) == [pytest.approx(0.18)]  # played out at 1.32; the third came at 1.5
    assert playback_gaps(chunks, buffer_s=0.2) == []  # a jitter buffer absorbs it
    assert playback_gaps([]) == []
    silence = np.zeros(3840, np.int16)  # 160 ms at 24 kHz
    assert TurnReply(audio=[silence] * 4, chunk_times_s=[t for t, _ in chunks]).gap_s == pytest.approx(0.18)
    late = ReplyPlayback("resp", chunks=[(t, silence) for t in (1.0, 1.1, 1.7, 1.75, 2.4)])
    assert late.underruns() == 2  # behind a 200 ms buffer: ran dry before 1.7 and before 2.4
