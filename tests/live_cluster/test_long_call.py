"""Calls longer than the Reasoner's context on the real cluster (Ray, Redis, the vLLM CPU Reasoner, the tiny
thinker's 4096 positions), over HTTP and /v1/realtime: every turn is answered, what truncation drops is the
oldest and is gone from the session and from Redis, a turn prefills only what is new, and a turn after truncation
is the offline reference's reply to the history it read. Long utterances (20 s and more) fill the context in a
few turns; replies are the package cluster's short ones (40 frames). About a minute and a half in all."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import redis.asyncio

from cluster.clients.realtime import RealtimeCaller
from cluster.pipeline.turn import build_conversation
from cluster.state.store import StateStore
from model.processing.audio import encode_mulaw, pcm16_wave, resample
from model.processing.processor import Message
from tests.live_cluster.conftest import MAX_FRAMES, caller, client, new_session, offline_voice

pytestmark = pytest.mark.vllm

BLOCK = 32  # the CPU-dev profile's KV-cache block: vLLM's prefix cache reuses whole blocks


def session_state(cluster, session_id: str) -> dict:
    reply = httpx.get(f"{cluster['url']}/v1/sessions/{session_id}", headers={"Authorization": "Bearer key-acme"})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_an_http_session_past_the_context_answers_every_turn_and_prefills_only_what_is_new(cluster, chroma):
    store = StateStore(redis.asyncio.Redis(port=cluster["settings"].redis_port))
    async with client(cluster) as api:
        _, session = await new_session(api, seed=60)
        assert session["truncation"] == "auto"
        dones, truncated_at = [], None
        for n in range(9):  # ~700 positions a turn: the 4096-position context holds five of them
            # The first turn after a commit that dropped history reads the truncated history: the offline reference
            # must answer it the same.
            read = await store.get_session("acme", session["id"]) if dones and dones[-1]["dropped"] else None
            read_audio = None if read is None else await store.load_history_audio(read)  # before this commit drops
            reply = await api.turn(session["id"], caller(61 + n, seconds=20.0), 16000)
            done = reply.done
            dones.append(done)
            if read is not None and truncated_at is None:
                truncated_at = n
                after = await store.get_session("acme", session["id"])
                user = Message("user", audio=pcm16_wave((await store.load_history_audio(after))[-2]), sample_rate=16000)
                offline = chroma.reply(build_conversation(read, read_audio, user),
                                       offline_voice(chroma, "A voice for the cluster.", 60), max_frames=MAX_FRAMES)
                assert (done["text"], done["frames"]) == (offline.text, offline.frames.shape[0])
        state = session_state(cluster, session["id"])
        audio_key = f"chroma:acme:session:{{{session['id']}}}:audio"
        stored = {k.decode() for k in await store.redis.hkeys(audio_key)}
        ttl = await store.redis.ttl(audio_key)
    await store.redis.aclose()
    assert state["version"] == 9 and truncated_at is not None  # every turn answered, none refused on length
    assert state["dropped"]["messages"] > 0 and state["dropped"]["item_ids"]
    assert stored == {m["id"] for m in state["history"] if m["audio_bytes"]} and 0 < ttl <= 3600
    for before, done in zip(dones, dones[1:]):
        assert done["prompt_tokens"] < 4096 - 21  # room for the reply
        # Only what the turn added is computed: the previous prompt is this one's prefix, or, after a commit that
        # dropped history ahead, the prompt the Reasoner warmed meanwhile is. vLLM reuses whole blocks, and now and
        # then recomputes the last block of the shared prefix as well.
        assert done["new_tokens"] is not None  # no turn had to truncate at its own start
        assert done["prompt_tokens"] - done["cached_tokens"] <= done["new_tokens"] + 2 * BLOCK
        if not before["dropped"]:
            assert done["new_tokens"] == done["prompt_tokens"] - before["prompt_tokens"]
            assert done["cached_tokens"] >= before["prompt_tokens"] // BLOCK * BLOCK - BLOCK
        assert done["shipped_bytes"]["Codec"] == dones[0]["shipped_bytes"]["Codec"]  # no conversation in it
        assert done["shipped_bytes"]["SpeechStack"] == dones[0]["shipped_bytes"]["SpeechStack"]


def item_audio(seconds: float, seed: int) -> str:
    """Caller audio as one conversation.item.create part: G.711 mu-law at 8 kHz, base64."""
    return base64.b64encode(encode_mulaw(resample(caller(seed, seconds), 16000, 8000))).decode()


async def ask(call: RealtimeCaller, cluster, seconds: float, seed: int) -> tuple[str, dict]:
    """A user item with `seconds` of audio and a response to it: (the item's id, response.done), once the turn is
    in the session (a reply joins the history once it has played: about 3 s here)."""
    after = len(call.events)
    await call.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": item_audio(seconds, seed)}]}})
    added = await call.wait_for("conversation.item.added", after=after)
    await call.send({"type": "response.create"})
    done = (await call.wait_for("response.done", timeout_s=300, after=after))["response"]
    if done["status"] == "completed":
        await committed(cluster, call, done["output"][0]["id"])
    return added["item"]["id"], done


async def committed(cluster, call: RealtimeCaller, item_id: str) -> None:
    session_id = next(e for e in reversed(call.events) if e["type"] == "session.updated")["session"]["id"]
    for _ in range(600):
        if item_id in {m["id"] for m in session_state(cluster, session_id)["history"]}:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"reply {item_id} never joined the session's history; errors: {call.errors()}")


async def test_a_realtime_call_hears_of_the_items_truncation_drops_and_disabled_waits_for_deletes(cluster, voice_id):
    formats = {"audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
                         "output": {"voice": voice_id}}}
    retention = {"type": "retention_ratio", "retention_ratio": 0.5, "token_limits": {"post_instructions": 900}}
    async with RealtimeCaller(cluster["url"], "key-acme") as call:
        updated = await call.configure(voice_id, "Be brief.", truncation=retention, **formats)
        assert updated["session"]["truncation"] == retention
        items = []
        for n in range(4):  # 10 s of audio is 250 positions, with its reply 260 to 500 a turn: against 900
            user_id, response = await ask(call, cluster, 10.0, 70 + n)
            assert response["status"] == "completed"
            items += [user_id, response["output"][0]["id"]]
        state = session_state(cluster, updated["session"]["id"])
        for _ in range(100):  # the events follow the commit
            deleted = [e["item_id"] for e in call.events if e["type"] == "conversation.item.deleted"]
            if deleted == state["dropped"]["item_ids"]:
                break
            await asyncio.sleep(0.1)
        assert deleted and set(deleted) <= set(items[:-2]) and deleted == state["dropped"]["item_ids"]
        assert not {m["id"] for m in state["history"]} & set(deleted)
        assert call.errors() == []

    async with RealtimeCaller(cluster["url"], "key-acme") as call:
        await call.configure(voice_id, "Be brief.", truncation="disabled", **formats)
        first, response = await ask(call, cluster, 55.0, 80)
        assert response["status"] == "completed"
        _, response = await ask(call, cluster, 55.0, 81)
        assert response["status"] == "completed"
        after = len(call.events)
        _, response = await ask(call, cluster, 55.0, 82)  # 3 x 1375 positions > 4096
        assert response["status"] == "failed" and response["status_details"]["error"]["code"] == "context_full"
        error = next(e for e in call.events[after:] if e["type"] == "error")["error"]
        assert error["code"] == "context_full" and "context of 4096" in error["message"]
        after = len(call.events)
        await call.send({"type": "conversation.item.delete", "item_id": "item_nope"})
        assert (await call.wait_for("error", after=after))["error"]["code"] == "item_not_found"
        await call.send({"type": "conversation.item.delete", "item_id": first})
        await call.wait_for("conversation.item.deleted", after=after, item_id=first)
        await call.send({"type": "response.create"})  # the third question is still pending: answered now
        done = await call.wait_for("response.done", timeout_s=300, after=after)
        assert done["response"]["status"] == "completed"


@pytest.fixture(scope="module")
def voice_id(cluster) -> str:
    audio = np.asarray(caller(90, 1.5))
    files = {"audio": ("voice.wav", _wav(audio), "audio/wav")}
    reply = httpx.post(f"{cluster['url']}/v1/voices", files=files, headers={"Authorization": "Bearer key-acme"},
                       data={"transcript": "A voice for long calls.", "name": "long"})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def _wav(audio: np.ndarray) -> bytes:
    from model.processing.audio import encode_wav

    return encode_wav(audio, 16000)
