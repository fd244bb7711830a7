"""`/v1/realtime` over a real WebSocket on the real app (uvicorn, a real redis-server, the engines in process: the
tiny RANDOM-WEIGHT checkpoint, so the replies are noise and only their lifecycle is looked at). Every event the server
sends validates against the `openai` SDK's `RealtimeServerEvent`.

What strict clients (pipecat, LiveKit Agents) rely on: client item ids kept, `previous_item_id` on every item added,
`metadata` and `usage` on the response, OpenAI's wording for a cancel with nothing active, item retrieval, semantic_vad,
a truncate past the audio clamped.

The barge-in rules, provoked again and again under CPU load:
- once `input_audio_buffer.speech_started` has interrupted a reply, not one more byte of that reply is sent;
- a second truncate of an item cannot cut its history below what the first one kept.

pipecat once took a stray audio delta, sent after speech_started, for a new reply and truncated the item again
with `audio_end_ms: 3`; the history then kept 3 ms of a reply the caller had heard for 1.73 s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import sys
import uuid

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio
import uvicorn
import websockets
from pydantic import TypeAdapter

from cluster.api.app import build_api
from cluster.pipeline.local import LocalTurnBackend
from cluster.settings import AppConfig
from cluster.settings.calls import CallSettings
from cluster.settings.state import StateSettings
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory
from model.processing.audio import CODEC_RATE, pcm16_bytes
from model.processing.processor import Conversation, Message
from model.testing.speech import speak_at
from tests.conftest import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROUNDS = 6
AUTH = {"Authorization": "Bearer key-acme"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(redis_port):
    client = redis.asyncio.Redis(port=redis_port)
    yield StateStore(client, StateSettings(key_prefix=f"b{uuid.uuid4().hex[:8]}"))
    await client.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(tiny_checkpoint, store):
    backend = LocalTurnBackend.from_config(AppConfig(
        checkpoint={"path": str(tiny_checkpoint)}, reasoner={"engine": "hf"},
        speech={"max_slots": 2, "max_queue": 0, "max_step_rtf": None}, codec={"max_streams": 2, "max_step_rtf": None},
        turns={"max_frames": 60, "max_tokens": 64},
    ), state=store)
    yield backend
    await backend.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(store, backend):
    """The app served by uvicorn on this test's own loop, where the engines were built."""
    app = build_api(store, TenantDirectory({"key-acme": "acme"}), backend, call_settings=CallSettings())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    yield f"ws://127.0.0.1:{server.config.port}/v1/realtime"
    server.should_exit = True
    await serving


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def voice_id(backend, store) -> str:
    transcript = "This is the voice of every reply."
    prompt = await backend.clone_voice(transcript, speak_at(transcript, CODEC_RATE), CODEC_RATE)
    voice = await store.create_voice("acme", "Ada", transcript, prompt.transcript_ids.tolist(), prompt.codes.numpy(),
                                     prompt.valid_frames)
    return voice.id


@pytest.fixture
def cpu_load():
    """Two busy processes beside the test on this 2-core machine: the event loop gets the CPU late."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


SERVER_EVENT = None


def server_event():
    global SERVER_EVENT
    if SERVER_EVENT is None:
        from openai.types.realtime import RealtimeServerEvent

        SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
    return SERVER_EVENT


class Caller:
    def __init__(self, ws):
        self.ws, self.events, self.arrived = ws, [], asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        async for message in self.ws:
            event = json.loads(message)
            server_event().validate_python(event)  # the SDK's own type, every event
            self.events.append(event)
            self.arrived.set()

    def of_type(self, kind: str, after: int = 0) -> list[dict]:
        return [e for e in self.events[after:] if e["type"] == kind]

    async def next(self, kind: str, after: int) -> dict:
        return self.events[await self.wait_for(lambda e: e["type"] in (kind, "error"), after=after)]

    async def send(self, **event):
        await self.ws.send(json.dumps(event))

    async def say(self, audio: np.ndarray):
        for chunk in np.array_split(audio, max(1, audio.size // 2400)):  # 100 ms chunks, faster than real time
            await self.send(type="input_audio_buffer.append", audio=base64.b64encode(pcm16_bytes(chunk)).decode())

    async def wait_for(self, test, after: int = 0, timeout_s: float = 120) -> int:
        """The index of the first event past `after` that passes `test`."""
        async with asyncio.timeout(timeout_s):
            while True:
                for i in range(after, len(self.events)):
                    if test(self.events[i]):
                        return i
                self.arrived.clear()
                await self.arrived.wait()


async def test_no_audio_after_speech_started_and_a_second_truncate_cannot_shrink(url, voice_id, store, cpu_load):
    question, interruption = speak_at("What is the weather like today?", CODEC_RATE), speak_at("Stop.", CODEC_RATE)
    silence = np.zeros(CODEC_RATE, np.float32)
    rng = random.Random(7)
    interrupted_while_generating = 0
    async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:
        call = Caller(ws)
        await call.send(type="session.update", session={"type": "realtime", "audio": {"output": {"voice": voice_id}}})
        updated = call.events[await call.wait_for(lambda e: e["type"] == "session.updated")]
        session_id = updated["session"]["id"]
        for _ in range(ROUNDS):
            mark = len(call.events)
            await call.say(np.concatenate([question, silence]))
            first = await call.wait_for(lambda e: e["type"] == "response.output_audio.delta", after=mark)
            reply_id, item_id = call.events[first]["response_id"], call.events[first]["item_id"]
            await asyncio.sleep(rng.uniform(0, 0.3))
            await call.say(np.concatenate([interruption, silence]))
            started = await call.wait_for(lambda e: e["type"] == "input_audio_buffer.speech_started", after=first)
            done = await call.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == reply_id,
                                       after=first)
            late = [e for e in call.events[started:]
                    if e["type"] == "response.output_audio.delta" and e["response_id"] == reply_id]
            assert late == [], f"{len(late)} audio deltas of {reply_id} after speech_started"
            interrupted_while_generating += done > started
            if done > started:
                assert call.events[done]["response"]["status"] == "cancelled"

            # The caller heard a part of what was sent; its client then truncates the item again, to 3 ms.
            sent_ms = sum(len(base64.b64decode(e["delta"])) for e in call.events[first:started]
                          if e["type"] == "response.output_audio.delta" and e["response_id"] == reply_id) // 48
            heard_ms = max(80, sent_ms // 2)
            for audio_end_ms in (heard_ms, 3):
                at = len(call.events)
                await call.send(type="conversation.item.truncate", item_id=item_id, content_index=0,
                                audio_end_ms=audio_end_ms)
                answer = call.events[await call.wait_for(
                    lambda e: e["type"] in ("conversation.item.truncated", "error"), after=at)]
                assert answer["type"] == "conversation.item.truncated", answer
                assert answer["audio_end_ms"] == heard_ms
                kept = [m.text for m in (await store.get_session("acme", session_id)).history if m.id == item_id]
                if audio_end_ms == heard_ms:
                    first_kept = kept
                assert kept == first_kept and len(kept) == 1
            # The interruption's own reply, answered in full, before the next round.
            await call.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] != reply_id, after=done)
        call.reader.cancel()
    print(f"{interrupted_while_generating} of {ROUNDS} barge-ins came while the reply was generating")


async def configured(ws, voice_id: str, **session) -> Caller:
    call = Caller(ws)
    await call.send(type="session.update", session={"type": "realtime", "audio": {"output": {"voice": voice_id}},
                                                    **session})
    await call.wait_for(lambda e: e["type"] == "session.updated")
    return call


async def test_what_strict_clients_rely_on(url, voice_id):
    async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:
        call = await configured(ws, voice_id, audio={"output": {"voice": voice_id},
                                                     "input": {"turn_detection": None}})
        at = len(call.events)
        await call.send(type="session.update", event_id="ev_0", session={"type": "realtime", "tools": [
            {"type": "function", "name": "lookup", "parameters": {}}]})
        unsupported = await call.next("error", at)
        assert unsupported["error"]["code"] == "unsupported_session_field"
        assert "session.tools" in unsupported["error"]["message"]
        at = len(call.events)
        await call.send(type="response.cancel")
        refused = await call.next("error", at)
        assert refused["error"]["code"] == "response_cancel_not_active"
        assert refused["error"]["message"].startswith("Cancellation failed")  # LiveKit stays quiet only for this

        # A typed message under the client's own id, answered with the client's metadata.
        at = len(call.events)
        await call.send(type="conversation.item.create", event_id="ev_1", item={
            "id": "item_client_1", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello there?"}]})
        added = await call.next("conversation.item.added", at)
        assert added["item"]["id"] == "item_client_1" and "previous_item_id" in added
        await call.send(type="conversation.item.create", event_id="ev_2", item={
            "id": "item_client_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]})
        duplicate = await call.next("error", at)
        assert duplicate["error"]["code"] == "invalid_item_id" and duplicate["error"]["event_id"] == "ev_2"
        at = len(call.events)
        await call.send(type="response.create", response={"metadata": {"client_event_id": "ev_3"}})
        created = await call.next("response.created", at)
        assert created["response"]["metadata"] == {"client_event_id": "ev_3"}
        assistant = next(e for e in call.of_type("conversation.item.added", at) if e["item"]["role"] == "assistant")
        assert assistant["previous_item_id"] == "item_client_1"
        done = (await call.next("response.done", at))["response"]
        assert done["status"] == "completed" and done["metadata"] == {"client_event_id": "ev_3"}
        assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_token_details"]["audio_tokens"] > 0
        assert call.of_type("response.output_audio.delta", at)  # a spoken answer to a text message

        # Items can be read back; unknown ones answer OpenAI's code.
        reply_item = done["output"][0]["id"]
        for item_id, role in (("item_client_1", "user"), (reply_item, "assistant")):
            at = len(call.events)
            await call.send(type="conversation.item.retrieve", item_id=item_id)
            retrieved = await call.next("conversation.item.retrieved", at)
            assert retrieved["type"] == "conversation.item.retrieved", retrieved
            assert (retrieved["item"]["id"], retrieved["item"]["role"]) == (item_id, role)
        at = len(call.events)
        await call.send(type="conversation.item.retrieve", item_id="item_nope")
        assert (await call.next("error", at))["error"]["code"] == "item_retrieve_invalid_item_id"

        # A truncate past the item's audio means all of it; output_audio_buffer.clear is accepted.
        at = len(call.events)
        await call.send(type="conversation.item.truncate", item_id=reply_item, content_index=0, audio_end_ms=10**6)
        truncated = await call.next("conversation.item.truncated", at)
        assert truncated["type"] == "conversation.item.truncated", truncated
        assert 0 < truncated["audio_end_ms"] < 10**6
        await call.send(type="output_audio_buffer.clear")
        await call.send(type="session.update", session={"type": "realtime", "instructions": "probe"})
        await call.wait_for(lambda e: e["type"] == "session.updated" and e["session"]["instructions"] == "probe",
                            after=at)
        assert call.of_type("error", at) == []
        call.reader.cancel()


async def test_semantic_vad_is_the_silence_window_its_eagerness_picks(url, voice_id):
    async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:
        call = await configured(ws, voice_id, audio={
            "output": {"voice": voice_id}, "input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}})
        detection = call.of_type("session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
        assert detection == {"type": "semantic_vad", "eagerness": "high", "create_response": True,
                             "interrupt_response": True}
        at = len(call.events)
        await call.say(np.concatenate([speak_at("Hello, how are you?", CODEC_RATE), np.zeros(CODEC_RATE, np.float32)]))
        stopped = await call.next("input_audio_buffer.speech_stopped", at)
        assert stopped["type"] == "input_audio_buffer.speech_stopped"
        assert (await call.next("response.done", at))["response"]["status"] == "completed"
        call.reader.cancel()


async def test_input_transcription_runs_beside_the_reply_and_joins_the_history(url, voice_id, store):
    """The Reasoner transcribes each committed utterance in a request of its own, once the reply has its first audio;
    the transcript (noise, from random weights) reaches the client and the session's history entry. Turned off, none
    is made."""
    async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:
        call = await configured(ws, voice_id, audio={
            "output": {"voice": voice_id}, "input": {"transcription": {"model": "whisper-1", "language": "en"}}})
        updated = call.of_type("session.updated")[-1]["session"]
        assert updated["audio"]["input"]["transcription"] == {"model": "whisper-1", "language": "en", "prompt": None}
        at = len(call.events)
        await call.say(np.concatenate([speak_at("Hello, how are you?", CODEC_RATE), np.zeros(CODEC_RATE, np.float32)]))
        committed = await call.next("input_audio_buffer.committed", at)
        item_id = committed["item_id"]
        completed_at = await call.wait_for(
            lambda e: e["type"] in ("conversation.item.input_audio_transcription.completed",
                                    "conversation.item.input_audio_transcription.failed"), after=at)
        completed = call.events[completed_at]
        assert completed["type"] == "conversation.item.input_audio_transcription.completed", completed
        assert completed["item_id"] == item_id and completed["usage"]["type"] == "duration"
        deltas = [e for e in call.events[at:completed_at]
                  if e["type"] == "conversation.item.input_audio_transcription.delta"]
        assert "".join(d["delta"] for d in deltas) == completed["transcript"]
        assert {d["item_id"] for d in deltas} <= {item_id}
        # It never went ahead of the reply's first audio.
        first_audio = await call.wait_for(lambda e: e["type"] == "response.output_audio.delta", after=at)
        first_transcription = next(i for i in range(at, len(call.events))
                                   if call.events[i]["type"].startswith("conversation.item.input_audio_transcription"))
        assert first_audio < first_transcription
        await call.next("response.done", at)

        async def transcript_in_history():
            while True:
                session = await store.get_session("acme", updated["id"])
                message = next((m for m in session.history if m.id == item_id), None)
                if message is not None and message.transcript is not None:
                    return message
                await asyncio.sleep(0.1)

        message = await asyncio.wait_for(transcript_in_history(), 60)
        assert message.role == "user" and message.transcript == completed["transcript"] and message.text is None

        # Turned off: the next utterance gets a reply and no transcription.
        await call.send(type="session.update", session={"type": "realtime", "audio": {"input": {"transcription": None}}})
        at = await call.wait_for(lambda e: e["type"] == "session.updated", after=len(call.events))
        assert call.events[at]["session"]["audio"]["input"]["transcription"] is None
        await call.say(np.concatenate([speak_at("And now?", CODEC_RATE), np.zeros(CODEC_RATE, np.float32)]))
        assert (await call.next("response.done", at))["response"]["status"] == "completed"
        await asyncio.sleep(1.0)
        assert [e for e in call.events[at:] if e["type"].startswith("conversation.item.input_audio_transcription")] == []
        call.reader.cancel()


async def test_a_response_with_no_new_input_answers_the_conversation_as_it_stands(url, voice_id, store):
    """LiveKit's greeting: response.create on a fresh session, nothing said yet."""
    async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:
        call = await configured(ws, voice_id)
        session_id = call.of_type("session.updated")[-1]["session"]["id"]
        at = len(call.events)
        await call.send(type="response.create")
        done = (await call.next("response.done", at))["response"]
        assert done["status"] == "completed" and call.of_type("response.output_audio.delta", at)
        assistant = next(e for e in call.of_type("conversation.item.added", at) if e["item"]["role"] == "assistant")
        assert assistant["previous_item_id"] is None
        history = await committed_history(store, session_id, 1)
        assert [(m.id, m.role) for m in history] == [(done["output"][0]["id"], "assistant")]

        # A voice turn after it is answered as ever, and follows the greeting in the history.
        at = len(call.events)
        await call.say(np.concatenate([speak_at("Hello, how are you?", CODEC_RATE), np.zeros(CODEC_RATE, np.float32)]))
        committed = await call.next("input_audio_buffer.committed", at)
        done = (await call.next("response.done", at))["response"]
        assert done["status"] == "completed" and call.of_type("response.output_audio.delta", at)
        history = await committed_history(store, session_id, 3)
        assert [m.role for m in history] == ["assistant", "user", "assistant"]
        assert [history[1].id, history[2].id] == [committed["item_id"], done["output"][0]["id"]]
        assert call.of_type("error") == []
        call.reader.cancel()


async def committed_history(store, session_id: str, messages: int):
    """The session's history once it holds `messages` (a reply is committed once the caller has heard it)."""
    async with asyncio.timeout(60):
        while len(history := (await store.get_session("acme", session_id)).history) < messages:
            await asyncio.sleep(0.1)
    return history


async def test_system_and_assistant_items_join_the_history_every_later_reply_reads(url, voice_id, store, backend):
    """pipecat sends text appended mid-call as `system` items (and `assistant` lines with input_text); LiveKit's
    update_chat_ctx sends system and assistant (output_text) items."""
    async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:
        call = await configured(ws, voice_id, instructions="Be brief.", audio={"output": {"voice": voice_id},
                                                                               "input": {"turn_detection": None}})
        session_id = call.of_type("session.updated")[-1]["session"]["id"]
        at = len(call.events)
        await call.send(type="conversation.item.create", item={
            "id": "item_sys_1", "type": "message", "role": "system",
            "content": [{"type": "input_text", "text": "The caller is called Ada."}]})
        await call.send(type="conversation.item.create", item={
            "id": "item_said_1", "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello Ada."}]})
        added = [await call.next("conversation.item.added", at)]
        added.append(await call.next("conversation.item.added", call.events.index(added[0]) + 1))
        assert [(e["item"]["id"], e["previous_item_id"]) for e in added] == [("item_sys_1", None),
                                                                            ("item_said_1", "item_sys_1")]
        assert added[0]["item"]["content"] == [{"type": "input_text", "text": "The caller is called Ada."}]
        assert added[1]["item"]["content"] == [{"type": "output_text", "text": "Hello Ada."}]
        for item_id, role, part in (("item_sys_1", "system", "input_text"), ("item_said_1", "assistant", "output_text")):
            mark = len(call.events)
            await call.send(type="conversation.item.retrieve", item_id=item_id)
            retrieved = (await call.next("conversation.item.retrieved", mark))["item"]
            assert (retrieved["role"], retrieved["content"][0]["type"]) == (role, part)

        # The reply's prompt holds both, after the session's instructions.
        at = len(call.events)
        await call.send(type="response.create")
        done = (await call.next("response.done", at))["response"]
        assert done["status"] == "completed"
        processor = backend.history.processor
        expected = processor.layout(Conversation("Be brief.", [Message("system", text="The caller is called Ada."),
                                                               Message("assistant", text="Hello Ada.")]))
        assert done["usage"]["input_tokens"] == len(expected.ids)
        reply_id = done["output"][0]["id"]
        history = await committed_history(store, session_id, 3)
        assert [(m.id, m.role) for m in history] == [("item_sys_1", "system"), ("item_said_1", "assistant"),
                                                     (reply_id, "assistant")]

        # A note created while a turn is waiting for its reply goes ahead of that turn, and says so.
        at = len(call.events)
        await call.send(type="conversation.item.create", item={
            "id": "item_user_2", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi?"}]})
        await call.next("conversation.item.added", at)
        mark = len(call.events)
        await call.send(type="conversation.item.create", item={
            "id": "item_sys_2", "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be kind."}]})
        note = await call.next("conversation.item.added", mark)
        assert (note["item"]["id"], note["previous_item_id"]) == ("item_sys_2", reply_id)
        await call.send(type="response.create")
        done = (await call.next("response.done", mark))["response"]
        assert done["status"] == "completed"
        history = await committed_history(store, session_id, 6)
        assert [m.id for m in history[3:]] == ["item_sys_2", "item_user_2", done["output"][0]["id"]]

        # The reply is no longer the history's last message, and a truncate still revises it.
        mark = len(call.events)
        await call.send(type="conversation.item.create", item={
            "id": "item_sys_3", "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Go on."}]})
        await call.next("conversation.item.added", mark)
        await call.send(type="conversation.item.truncate", item_id=done["output"][0]["id"], content_index=0,
                        audio_end_ms=0)
        truncated = await call.next("conversation.item.truncated", mark)
        assert truncated["audio_end_ms"] == 0
        async with asyncio.timeout(30):
            while (await store.get_session("acme", session_id)).history[5].text:
                await asyncio.sleep(0.1)
        assert call.of_type("error", at) == []

        # Bad ones are named; the call goes on.
        for item, named in (({"role": "system", "content": [{"type": "input_audio", "audio": "AAAA"}]}, "input_audio"),
                            ({"role": "system", "content": [{"type": "input_text", "text": "  "}]}, "input_text"),
                            ({"id": "item_sys_1", "role": "system", "content": [{"type": "input_text", "text": "x"}]},
                             "item_sys_1")):
            mark = len(call.events)
            await call.send(type="conversation.item.create", item={"type": "message", **item})
            error = (await call.next("error", mark))["error"]
            assert named in error["message"], error
        call.reader.cancel()

    async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:  # no voice: no history yet
        call = Caller(ws)
        await call.wait_for(lambda e: e["type"] == "session.created")
        await call.send(type="conversation.item.create", item={
            "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be kind."}]})
        assert (await call.next("error", 0))["error"]["code"] == "no_voice"
        call.reader.cancel()
