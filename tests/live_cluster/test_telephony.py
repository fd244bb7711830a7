"""Phone calls over /v1/telephony/twilio (and /telnyx) on the real cluster: Ray, Redis, the vLLM CPU Reasoner.
Twilio's side is played with `websockets` from Twilio's documented message shapes (cluster/clients/phone.py),
with an 8 kHz playback clock that echoes marks as it plays. Caller audio is espeak-ng speech; weights RANDOM."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import numpy as np
import pytest
import redis.asyncio

from cluster.clients.http import ChromaClient
from cluster.clients.phone import FRAME, CarrierCall
from cluster.pipeline.turn import build_conversation
from cluster.state.store import StateStore
from model.processing.audio import decode_audio, pcm16_wave
from model.processing.processor import Message
from model.testing.speech import speak
from tests.live_cluster.conftest import CALL_LIMIT_PER_TENANT, MAX_FRAMES, offline_voice, reference_clip
from tests.live_cluster.conftest import wait_for_no_slots_in_use

pytestmark = pytest.mark.vllm

TRANSCRIPT = "A voice for the phone line."
LEAD_MS = 400  # the default TelephonySettings.max_lead_ms


@pytest.fixture(scope="module")
def voice_id(cluster) -> str:
    async def create():
        async with ChromaClient(cluster["url"], "key-acme") as api:
            return (await api.create_voice("phone", TRANSCRIPT, reference_clip(31), 24000))["id"]

    return asyncio.run(create())


def silence_task(call: CarrierCall, seconds: float = 30.0) -> asyncio.Task:
    """The caller listening: a phone line keeps sending (silent) frames."""
    return asyncio.create_task(call.say(np.zeros(int(seconds * 8000), np.float32), 8000))


async def test_a_call_with_two_turns_and_a_barge_in(cluster, voice_id, chroma):
    question, rate = speak("Hello, can you tell me what the weather is like today?")
    follow_up, _ = speak("And what about tomorrow morning?")
    interruption, _ = speak("Wait, stop please.")
    async with CarrierCall(cluster["url"], {"api_key": "key-acme", "voice_id": voice_id}) as call:
        await call.say(question, rate)
        listening = silence_task(call)
        await call.reply_over()
        first_reply_media = len(call.received.media)
        listening.cancel()
        await call.say(follow_up, rate)
        listening = silence_task(call)
        await call.wait(lambda r: len(r.media) > first_reply_media + 3)  # the second reply is playing
        await asyncio.sleep(0.6)
        listening.cancel()
        interrupting_at = time.monotonic()
        await call.say(interruption, rate, trailing_silence_s=0.2)
        await call.wait(lambda r: r.clears, timeout_s=30)
        cleared_at = call.received.clears[0]
        # The server cuts at the last mark it had back when it stopped playback. It has every mark echoed before the
        # interruption's first frame (one socket, in order; allow the one echo racing that frame), and none echoed
        # once the clear was on its way. In between, how many come back depends on both sides' scheduling.
        before_clear = [(at, name) for at, name in call.received.echoed if at < cleared_at]
        surely_acked = max(i for i, (at, _) in enumerate(before_clear) if at < interrupting_at)
        cut_reply = before_clear[-1][1].rsplit(":", 1)[0]
        heard_marks = [name for _, name in before_clear[max(0, surely_acked - 1):] if name.startswith(f"{cut_reply}:")]
        listening = silence_task(call)
        await call.wait(lambda r: any(at > cleared_at for at, _ in r.media), timeout_s=180)  # the next reply follows
        await call.reply_over()
        listening.cancel()
    received = call.received
    assert received.stream_ids == {call.stream_id}  # every message carries the stream
    assert all(len(payload) % FRAME == 0 for _, payload in received.media)  # 20 ms multiples, no file header
    audio, rate = decode_audio(call.audio(), encoding="mulaw")
    assert rate == 8000 and audio.size == len(call.audio())
    assert len(received.marks) == len(received.media)  # a mark after each chunk
    echoed = {name: at for at, name in received.echoed}
    assert set(received.marks) <= set(echoed)  # every mark came back: played, or dropped by the clear
    assert received.max_lead_ms <= LEAD_MS  # never more unplayed audio at the carrier than the bound
    assert call.close_code is not None or call.closed.is_set()

    # The session: three turns; the barged-in one holds exactly the tokens of the frames played by the last
    # acknowledged mark (token k entered with frame 2k). Its full reply is the offline one to the same dialogue.
    store = StateStore(redis.asyncio.Redis(port=cluster["settings"].redis_port))
    state = await session_of_stream(cluster, store, voice_id)
    history = state.history
    assert [m.role for m in history] == ["user", "assistant"] * 3
    audio_of = await store.load_history_audio(state)
    prefix = state.model_copy(update={"history": history[:2]})
    second_user = Message("user", audio=pcm16_wave(audio_of[2]), sample_rate=16000)
    offline = chroma.reply(build_conversation(prefix, audio_of[:2], second_user),
                           offline_voice(chroma, TRANSCRIPT, 31), max_frames=MAX_FRAMES)
    cuts = {chroma.processor.decode_text(offline.text_tokens[: math.ceil(int(name.rsplit(":", 1)[1]) // 80 / 2)])
            for name in heard_marks}
    assert history[3].text in cuts
    await store.redis.aclose()
    in_use = await wait_for_no_slots_in_use(cluster)
    assert in_use == dict.fromkeys(in_use, 0)


async def session_of_stream(cluster, store: StateStore, voice_id: str):
    """The newest session in this voice (a phone call's session id is the server's to make)."""
    keys = [k async for k in store.redis.scan_iter(match="chroma:acme:session:{sess_*}")]
    sessions = [await store.get_session("acme", k.decode().split("{")[1].rstrip("}")) for k in keys
                if not k.decode().endswith(":audio")]
    return max((s for s in sessions if s.voice_id == voice_id), key=lambda s: s.created_at)


async def test_refused_calls_get_no_audio(cluster, voice_id):
    other = httpx.post(f"{cluster['url']}/v1/voices", headers={"Authorization": "Bearer key-other"},
                       files={"audio": ("v.wav", _wav(), "audio/wav")}, data={"transcript": "Other.", "name": "o"})
    for parameters in ({"voice_id": voice_id}, {"api_key": "wrong", "voice_id": voice_id},
                       {"api_key": "key-acme", "voice_id": other.json()["id"]}, {"api_key": "key-acme"}):
        async with CarrierCall(cluster["url"], parameters) as call:
            await asyncio.wait_for(call.closed.wait(), 30)
        assert call.close_code == 1008 and call.received.media == [], parameters
    async with CarrierCall(cluster["url"], {"api_key": "key-acme", "voice_id": voice_id}, "telnyx", "G729") as call:
        await asyncio.wait_for(call.closed.wait(), 30)
    assert call.close_code == 1008 and call.received.media == []  # a format we do not speak: retrying will not help


def _wav() -> bytes:
    from model.processing.audio import encode_wav

    return encode_wav(reference_clip(32), 24000)


async def test_bad_input_keeps_the_call_alive(cluster, voice_id):
    question, rate = speak("Hello there, are you still with me?")
    async with CarrierCall(cluster["url"], {"api_key": "key-acme", "voice_id": voice_id}) as call:
        await call.ws.send("{not json")
        await call.send({"event": "media", "media": {"payload": "@@not-base64@@"}})
        await call.send({"event": "media", "media": {"payload": ""}})  # a payload of no audio
        await call.send({"event": "media", "media": {"payload": "A" * 400_000}})  # far more than a frame
        await call.send({"event": "teleport"})
        await call.send({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}})
        await call.say(question, rate)
        listening = silence_task(call)
        await call.wait(lambda r: r.media, timeout_s=180)  # still answered
        listening.cancel()
    assert not call.received.clears


async def test_media_before_start_is_ignored(cluster, voice_id):
    async with CarrierCall(cluster["url"], {"api_key": "key-acme", "voice_id": voice_id}) as call:
        pass
    url = cluster["url"].replace("http", "ws") + "/v1/telephony/twilio"
    import websockets

    async with websockets.connect(url) as ws:
        await ws.send('{"event": "media", "media": {"payload": "AAAA"}}')
        await ws.send('{"event": "connected"}')
        await asyncio.sleep(0.3)
        assert ws.close_code is None  # the socket is still open, waiting for start
    assert call.received.media == []


async def test_over_the_tenant_cap_a_call_is_refused_at_once(cluster):
    other = httpx.post(f"{cluster['url']}/v1/voices", headers={"Authorization": "Bearer key-other"},
                       files={"audio": ("v.wav", _wav(), "audio/wav")}, data={"transcript": "Other.", "name": "o"})
    parameters = {"api_key": "key-other", "voice_id": other.json()["id"]}
    calls = [await CarrierCall(cluster["url"], parameters).__aenter__() for _ in range(CALL_LIMIT_PER_TENANT)]
    try:
        await asyncio.sleep(0.5)
        async with CarrierCall(cluster["url"], parameters) as refused:
            await asyncio.wait_for(refused.closed.wait(), 10)
        assert refused.close_code == 1013 and refused.received.media == []
    finally:
        for call in calls:
            await call.hang_up()


@pytest.mark.parametrize("moment", ["after start", "mid reply"])
async def test_abrupt_disconnects_free_every_slot(cluster, voice_id, moment):
    question, rate = speak("Tell me a long story about the sea.")
    call = await CarrierCall(cluster["url"], {"api_key": "key-acme", "voice_id": voice_id}).__aenter__()
    if moment == "mid reply":
        await call.say(question, rate)
        listening = silence_task(call)
        await call.wait(lambda r: r.media, timeout_s=180)
        listening.cancel()
    call.ws.transport.abort()
    for task in call._tasks:
        task.cancel()
    in_use = await wait_for_no_slots_in_use(cluster)
    assert in_use == dict.fromkeys(in_use, 0)


async def test_the_telnyx_dialect_is_the_same_call(cluster, voice_id):
    """The same caller audio over Telnyx (PCMU) and Twilio gets the same reply, byte for byte; PCMA works too."""
    question, rate = speak("Hello, is this the right number?")
    replies = {}
    for dialect, encoding in (("twilio", "PCMU"), ("telnyx", "PCMU"), ("telnyx", "PCMA")):
        async with CarrierCall(cluster["url"], {"api_key": "key-acme", "voice_id": voice_id}, dialect=dialect,
                               encoding=encoding) as call:
            await call.say(question, rate)
            listening = silence_task(call)
            await call.reply_over()
            listening.cancel()
        assert call.received.stream_ids == {call.stream_id} and call.received.media
        replies[dialect, encoding] = call.audio()
    assert replies["telnyx", "PCMU"] == replies["twilio", "PCMU"]
    assert len(replies["telnyx", "PCMA"]) % FRAME == 0
