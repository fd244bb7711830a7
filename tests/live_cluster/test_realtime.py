"""Live calls over /v1/realtime on the real cluster (Ray, Redis, the vLLM CPU Reasoner), with real clients: the
official `openai` SDK's realtime client and, for what the SDK refuses to send (malformed frames), `websockets`.
Caller audio is real speech from espeak-ng, streamed in real time. The checkpoint's weights are RANDOM."""

from __future__ import annotations

import asyncio
import base64
import json
import math

import httpx
import numpy as np
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from pydantic import TypeAdapter

from cluster.clients.realtime import RealtimeCaller
from cluster.local.faults import FaultAgent, paused
from model.processing.audio import CODEC_RATE, encode_wav, pcm16_bytes
from model.testing.speech import speak, speak_at
from tests.live_cluster.conftest import CALL_LIMIT_PER_TENANT, wait_for_no_slots_in_use

pytestmark = pytest.mark.vllm

QUESTION = "Hello, can you tell me what the weather is like today?"
INTERRUPTION = "Wait, wait, please stop for a moment."


@pytest.fixture(scope="module")
def voice_id(cluster) -> str:
    audio, rate = speak("This is the voice you will hear in every reply.")
    files = {"audio": ("voice.wav", encode_wav(audio, rate), "audio/wav")}
    reply = httpx.post(f"{cluster['url']}/v1/voices", files=files, headers={"Authorization": "Bearer key-acme"},
                       data={"transcript": "This is the voice you will hear in every reply.", "name": "realtime"})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def history(cluster, session_id: str, key: str = "key-acme") -> dict:
    reply = httpx.get(f"{cluster['url']}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_the_openai_sdk_holds_a_call(cluster, voice_id):
    from openai import AsyncOpenAI
    from openai.types.realtime import RealtimeServerEvent

    server_event = TypeAdapter(RealtimeServerEvent)
    client = AsyncOpenAI(api_key="key-acme", websocket_base_url=cluster["url"].replace("http", "ws") + "/v1")
    speech = speak_at(QUESTION, CODEC_RATE)
    seen = []
    async with client.realtime.connect(model="chroma-1.0") as connection:
        await connection.session.update(session={
            "type": "realtime", "instructions": "Be brief.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                      "output": {"voice": voice_id, "format": {"type": "audio/pcm", "rate": 24000}}},
        })

        async def microphone():
            for chunk in np.array_split(np.concatenate([speech, np.zeros(3 * CODEC_RATE, np.float32)]), 60):
                await connection.input_audio_buffer.append(audio=base64.b64encode(pcm16_bytes(chunk)).decode())
                await asyncio.sleep(chunk.size / CODEC_RATE)

        sending = asyncio.create_task(microphone())
        audio_bytes = 0
        async for event in connection:
            server_event.validate_python(event.model_dump(exclude_unset=True))  # the SDK's own type, every event
            seen.append(event.type)
            if event.type == "response.output_audio.delta":
                audio_bytes += len(base64.b64decode(event.delta))
            if event.type == "response.done":
                done = event
                break
        sending.cancel()
    order = [t for t in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "response.created", "response.output_audio.delta",
                         "response.done") if t in seen]
    assert order == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "response.created", "response.output_audio.delta",
                     "response.done"]
    assert seen.index("input_audio_buffer.speech_stopped") < seen.index("response.output_audio.delta")
    assert seen[0] == "session.created" and "error" not in seen
    assert done.response.status == "completed"
    assert audio_bytes > 0 and audio_bytes % (1920 * 2) == 0  # whole 80 ms frames of PCM16 at 24 kHz
    await wait_for_no_slots_in_use(cluster)


@pytest.fixture(scope="module")
def codec_pids(cluster) -> list[int]:
    agent = FaultAgent(cluster["settings"])
    try:
        return agent.pids("Codec")
    finally:
        agent.close()


async def test_barge_in_cancels_and_history_keeps_what_was_played(cluster, voice_id, codec_pids):
    """A reply still generating when the caller talks over it is cancelled. The generation is held: once the first
    audio is out, the Codec replica is paused, so the rest of the reply cannot reach the Ingress however fast the
    machine generated it."""
    async with RealtimeCaller(cluster["url"], "key-acme") as call:
        await call.configure(voice_id, "Be brief.")
        await call.say(speak_at(QUESTION, CODEC_RATE), trailing_silence_s=0.0)
        silence = asyncio.create_task(call.say(np.zeros(30 * CODEC_RATE, np.float32)))
        await call.wait_for("response.output_audio.delta", timeout_s=180)
        with paused(codec_pids):
            mark = len(call.events)
            silence.cancel()
            interrupting = asyncio.create_task(call.say(speak_at(INTERRUPTION, CODEC_RATE), trailing_silence_s=1.0))
            barge_in = await call.wait_for("input_audio_buffer.speech_started", after=mark)
        reply = await call.next_reply()
        # Only a reply whose generation ended before the pause (so its response.done preceded the barge-in) could
        # complete; once paused, nothing more of it reaches the Ingress until the caller has spoken.
        ended_first = any(e["type"] == "response.done" for e in call.events[:call.events.index(barge_in)])
        assert reply.status == ("completed" if ended_first else "cancelled")
        played_ms = int(reply.played_ms(reply.done_at))
        await truncate(call, reply, played_ms)
        await interrupting
        session_id = session_of(call)
    await check_history_keeps_what_was_played(cluster, session_id, reply, played_ms)


async def test_barge_in_on_a_generated_reply_keeps_what_was_played(cluster, voice_id):
    """A reply fully generated but still playing ends `completed`; the caller's barge-in and truncate cut the history
    to what was played."""
    async with RealtimeCaller(cluster["url"], "key-acme") as call:
        await call.configure(voice_id, "Be brief.")
        await call.say(speak_at(QUESTION, CODEC_RATE), trailing_silence_s=0.0)
        silence = asyncio.create_task(call.say(np.zeros(30 * CODEC_RATE, np.float32)))
        reply = await call.next_reply()
        assert reply.status == "completed"
        mark = len(call.events)
        silence.cancel()
        interrupting = asyncio.create_task(call.say(speak_at(INTERRUPTION, CODEC_RATE), trailing_silence_s=1.0))
        barge_in = await call.wait_for("input_audio_buffer.speech_started", after=mark)
        played_ms = int(reply.played_ms(barge_in["_at"]))  # the client stops playing here, as pipecat and LiveKit do
        await truncate(call, reply, played_ms)
        await interrupting
        session_id = session_of(call)
    await check_history_keeps_what_was_played(cluster, session_id, reply, played_ms)


async def truncate(call: RealtimeCaller, reply, played_ms: int) -> None:
    await call.send({"type": "conversation.item.truncate", "item_id": reply.item_id, "content_index": 0,
                     "audio_end_ms": played_ms})
    truncated = await call.wait_for("conversation.item.truncated", item_id=reply.item_id)
    assert truncated["audio_end_ms"] == played_ms
    assert not call.errors(), call.errors()


async def check_history_keeps_what_was_played(cluster, session_id: str, reply, played_ms: int) -> None:
    """The interrupted turn is in the history with the tokens of the frames that were played: token k entered with
    frame 2k, and each transcript delta here is one token."""
    heard_frames = played_ms // 80
    turns = history(cluster, session_id)["history"]
    assert [m["role"] for m in turns[:2]] == ["user", "assistant"]
    assert turns[1]["text"] == "".join(reply.transcript[: math.ceil(heard_frames / 2)])
    assert len(turns[1]["text"]) < len("".join(reply.transcript)) or heard_frames >= 2 * len(reply.transcript)
    in_use = await wait_for_no_slots_in_use(cluster)
    assert in_use == dict.fromkeys(in_use, 0)


def session_of(call: RealtimeCaller) -> str:
    """The call's Redis session, as its last session.updated tells it."""
    return next(e for e in reversed(call.events) if e["type"] == "session.updated")["session"]["id"]


async def test_a_dropped_call_resumes_its_session(cluster, voice_id):
    async with RealtimeCaller(cluster["url"], "key-acme") as call:
        await call.configure(voice_id, "Be brief.", audio={"input": {"turn_detection": None},
                                                           "output": {"voice": voice_id}})
        await call.say(speak_at("Good morning.", CODEC_RATE))
        await call.send({"type": "input_audio_buffer.commit"})
        await call.send({"type": "response.create"})
        await call.next_reply()
        session_id = session_of(call)
    await asyncio.sleep(0.5)  # let the hung-up call commit what was heard
    assert history(cluster, session_id)["version"] == 1
    async with RealtimeCaller(cluster["url"], "key-acme", session_id=session_id) as call:
        await call.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]}})
        await call.send({"type": "response.create"})
        second = await call.next_reply()
        assert second.status == "completed"
    await asyncio.sleep(0.5)
    state = history(cluster, session_id)
    assert state["version"] == 2
    assert [m["role"] for m in state["history"]] == ["user", "assistant", "user", "assistant"]
    assert state["history"][2]["text"] == "And tomorrow?"


async def test_input_transcription_comes_from_the_reasoner_and_joins_the_history(cluster, voice_id):
    """Through the cluster: the Ingress asks the Reasoner deployment (vLLM) for the transcription beside the reply;
    HTTP clients then read the transcript in the session's history (noise, from random weights)."""
    async with RealtimeCaller(cluster["url"], "key-acme") as call:
        await call.configure(voice_id, "Be brief.", audio={"output": {"voice": voice_id},
                                                           "input": {"transcription": {"model": "chroma-1.0"}}})
        await call.say(speak_at(QUESTION, CODEC_RATE), trailing_silence_s=1.0)
        committed = await call.wait_for("input_audio_buffer.committed")
        reply = await call.next_reply()
        assert reply.status == "completed"
        done = await call.wait_for(("conversation.item.input_audio_transcription.completed",
                                    "conversation.item.input_audio_transcription.failed"), item_id=committed["item_id"])
        assert done["type"] == "conversation.item.input_audio_transcription.completed", done
        session_id = session_of(call)
    await asyncio.sleep(0.5)
    user = next(m for m in history(cluster, session_id)["history"] if m["id"] == committed["item_id"])
    assert user["transcript"] == done["transcript"] and user["text"] is None


async def test_bad_input_gets_errors_and_the_call_goes_on(cluster, voice_id):
    url = cluster["url"].replace("http", "ws") + "/v1/realtime"
    async with websockets.connect(url, additional_headers={"Authorization": "Bearer key-acme"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"

        async def expect_error(message, code: str):
            await ws.send(message)
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert event["type"] == "error", event
            assert event["error"]["code"] == code and event["error"]["message"], event
            for internal in ("Traceback", ".py", "ray::"):
                assert internal not in event["error"]["message"]

        await expect_error("{not json", "invalid_json")
        await expect_error(json.dumps({"no": "type"}), "invalid_event")
        await expect_error(json.dumps({"type": "response.teleport"}), "invalid_event_type")
        await expect_error(json.dumps({"type": "input_audio_buffer.append", "audio": "@@@not base64@@@"}), "invalid_base64")
        odd = base64.b64encode(b"\x01\x02\x03").decode()  # audio/pcm is 16-bit: three bytes cannot be
        await expect_error(json.dumps({"type": "input_audio_buffer.append", "audio": odd}), "invalid_audio")
        await expect_error(json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty")
        await expect_error(json.dumps({"type": "response.cancel"}), "response_cancel_not_active")
        await expect_error(json.dumps({"type": "response.create"}), "no_voice")  # nothing said is fine; no voice is not
        await expect_error(json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
                                       "audio_end_ms": 10}), "item_not_found")
        eager = {"type": "semantic_vad", "eagerness": "eager"}
        await expect_error(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": eager}}}}), "invalid_turn_detection")
        await expect_error(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"output": {"voice": "voice_" + "0" * 32}}}}), "not_found")
        await expect_error(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"output": {"format": {"type": "audio/mp3"}}}}}), "invalid_event")
        await expect_error(b"\x00\x01binary", "invalid_event")
        await expect_error("x" * (2 << 20), "message_too_large")
        # still usable: a valid update is answered
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "instructions": "Still here.", "audio": {"output": {"voice": voice_id}}}}))
        updated = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Still here."


async def test_refusals_at_the_handshake(cluster):
    url = cluster["url"].replace("http", "ws") + "/v1/realtime"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
    # The per-tenant cap on live calls: the next call is refused at once, with Retry-After.
    calls = [await websockets.connect(url, additional_headers={"Authorization": "Bearer key-other"})
             for _ in range(CALL_LIMIT_PER_TENANT)]
    try:
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers={"Authorization": "Bearer key-other"}):
                pass
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers["Retry-After"] == "1"
        assert json.loads(refused.value.response.body)["error"]["code"] == "tenant_concurrency_limit"
    finally:
        for ws in calls:
            await ws.close()


async def test_an_abrupt_disconnect_mid_reply_frees_every_slot(cluster, voice_id):
    call = RealtimeCaller(cluster["url"], "key-acme")
    await call.__aenter__()
    await call.configure(voice_id)
    await call.say(speak_at(QUESTION, CODEC_RATE), trailing_silence_s=0.8)
    await call.wait_for("response.output_audio.delta", timeout_s=180)
    call.ws.transport.abort()  # no close handshake: the network went away
    in_use = await wait_for_no_slots_in_use(cluster)
    assert in_use == dict.fromkeys(in_use, 0)


async def test_early_start_drops_a_reply_started_in_a_pause_without_a_trace(cluster, voice_id):
    """With early start, the comma's pause (shorter than the silence window) starts a reply that is dropped
    when the caller goes on: the client sees one reply only, to the whole sentence."""
    async with RealtimeCaller(cluster["url"], "key-acme") as call:
        await call.configure(voice_id, "Be brief.", audio={
            "input": {"turn_detection": {"type": "server_vad", "early_start": True}}, "output": {"voice": voice_id}})
        await call.say(speak_at("One moment, please let me check that for you.", CODEC_RATE))
        listening = asyncio.create_task(call.say(np.zeros(30 * CODEC_RATE, np.float32)))
        reply = await call.next_reply()
        listening.cancel()
        kinds = [e["type"] for e in call.events]
        session_id = session_of(call)
        assert reply.status == "completed" and not call.errors()
    assert kinds.count("response.created") == 1 and kinds.count("input_audio_buffer.committed") == 1
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    await asyncio.sleep(1.0 + reply.audio_ms / 1000)  # the reply is committed once it has played
    turns = history(cluster, session_id)["history"]
    assert [m["role"] for m in turns] == ["user", "assistant"]
    in_use = await wait_for_no_slots_in_use(cluster)
    assert in_use == dict.fromkeys(in_use, 0)
