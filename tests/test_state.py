"""The Redis state store against a real redis-server (one per module, plus fresh ones for the restart test)."""

from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import pydantic
import pytest
import redis.asyncio
import torch

from cluster.settings.state import StateSettings
from cluster.settings.tenants import TenantSettings
from cluster.state.redis_server import start_local_redis, stop_local_redis
from cluster.state.history import HistoryDrop
from cluster.state.store import SessionSampling, StateStore, VersionConflict, audio_digest, redis_client
from cluster.state.tenants import TenantDirectory
from model.errors import NotFound, StateUnavailable
from model.processing.audio import ReplyFormat
from tests.conftest import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

TTL_S = 5


@pytest.fixture
def store(redis_db) -> StateStore:
    # A fresh key prefix per test keeps the tests apart on the shared server.
    return StateStore(redis_db, StateSettings(session_ttl_s=TTL_S, key_prefix=f"t{uuid.uuid4().hex[:8]}"))


def make_codes(frames: int = 13, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, size=(frames, 8))


def pcm(seconds: float, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(-3000, 3000, int(16000 * seconds), dtype=np.int16).tobytes()


async def new_voice(store: StateStore, tenant: str = "acme", seed: int = 0):
    return await store.create_voice(tenant, "Ada", "Hello there.", [9, 8, 7], make_codes(seed=seed), valid_frames=12)


async def test_voice_round_trip(store, redis_db):
    codes = make_codes()
    first = await store.create_voice("acme", "Ada", "Hello there.", [9, 8, 7], torch.from_numpy(codes), 12)
    second = await new_voice(store, seed=1)
    assert first.id.startswith("voice_") and first.id != second.id

    got = await store.get_voice("acme", first.id)
    assert got.codes_array().shape == (13, 8)
    np.testing.assert_array_equal(got.codes_array(), codes)
    assert (got.name, got.transcript, got.transcript_ids, got.valid_frames) == ("Ada", "Hello there.", [9, 8, 7], 12)
    assert got.created_at == first.created_at
    assert "codes" not in got.model_dump()  # API bodies stay small
    assert await redis_db.ttl(store._voice_key("acme", first.id)) == -1  # voices never expire

    assert [v.id for v in await store.list_voices("acme")] == [first.id, second.id]
    assert await store.list_voices("other") == []

    await store.delete_voice("acme", first.id)
    with pytest.raises(NotFound):
        await store.get_voice("acme", first.id)
    with pytest.raises(NotFound):
        await store.delete_voice("acme", first.id)
    assert [v.id for v in await store.list_voices("acme")] == [second.id]


async def test_voice_codes_are_checked(store):
    bad = [(np.arange(8), 1), (-make_codes() - 1, 12), (make_codes().astype(float), 12), (make_codes(), 0)]
    for codes, valid in bad:
        with pytest.raises(ValueError):
            await store.create_voice("acme", "Ada", "Hi.", [1], codes, valid)


async def test_session_create_get_delete(store, redis_db):
    voice = await new_voice(store)
    sampling = SessionSampling(temperature=0.7, top_k=20, seed=3)
    session = await store.create_session("acme", voice.id, "Be brief.", ReplyFormat.MULAW_8K, sampling)
    assert session.id.startswith("sess_") and session.version == 0 and session.history == []

    got = await store.get_session("acme", session.id)
    assert got == session
    assert got.output_format is ReplyFormat.MULAW_8K and got.sampling == sampling

    await store.delete_session("acme", session.id)
    with pytest.raises(NotFound):
        await store.get_session("acme", session.id)
    with pytest.raises(NotFound):
        await store.delete_session("acme", session.id)
    with pytest.raises(pydantic.ValidationError):
        SessionSampling(temperature=2.5)


async def test_other_tenants_and_unknown_ids_are_not_found(store):
    voice = await new_voice(store)
    session = await store.create_session("acme", voice.id)
    unknown_voice, unknown_session = f"voice_{uuid.uuid4().hex}", f"sess_{uuid.uuid4().hex}"
    attempts = {
        "voice": [
            store.get_voice("evil", voice.id), store.delete_voice("evil", voice.id),
            store.create_session("evil", voice.id), store.get_voice("acme", unknown_voice),
            store.create_session("acme", unknown_voice), store.get_voice("acme", "../voice:x"),
        ],
        "session": [
            store.get_session("evil", session.id), store.delete_session("evil", session.id),
            store.append_turn("evil", session.id, pcm(0.1), "hi", 0), store.get_session("acme", unknown_session),
            store.append_turn("acme", unknown_session, pcm(0.1), "hi", 0), store.get_session("acme", "*"),
        ],
    }
    for kind, calls in attempts.items():
        for call in calls:
            with pytest.raises(NotFound) as caught:
                await call
            assert isinstance(caught.value, KeyError) and caught.value.kind == kind
            assert str(caught.value).startswith(f"{kind} '")
    # acme's own state is untouched
    assert (await store.get_session("acme", session.id)).history == []
    assert (await store.get_voice("acme", voice.id)).id == voice.id


async def test_deleted_voice_fails_the_next_turn(store):
    voice = await new_voice(store)
    session = await store.create_session("acme", voice.id)
    await store.delete_voice("acme", voice.id)
    session = await store.get_session("acme", session.id)  # the session itself stays
    with pytest.raises(NotFound, match="voice"):
        await store.get_voice("acme", session.voice_id)


async def test_append_turn_keeps_history_and_audio(store):
    session = await store.create_session("acme", (await new_voice(store)).id)
    first, second = pcm(0.5, seed=1), pcm(0.3, seed=2)
    session = await store.append_turn("acme", session.id, first, "One.", expected_version=0)
    session = await store.append_turn("acme", session.id, second, "Two.", expected_version=1)

    got = await store.get_session("acme", session.id)
    assert got == session and got.version == 2
    assert [(t.role, t.text) for t in got.history] == [("user", None), ("assistant", "One."), ("user", None),
                                                       ("assistant", "Two.")]
    assert await store.load_history_audio(got) == [first, None, second, None]
    with pytest.raises(ValueError):
        await store.append_turn("acme", session.id, b"\x00\x01\x02", "odd", expected_version=2)


async def test_a_reply_to_no_new_input_commits_only_the_reply(store):
    """A realtime response.create with nothing said: the greeting joins the history alone, and a turn follows it."""
    session = await store.create_session("acme", (await new_voice(store)).id)
    session = await store.append_turn("acme", session.id, None, "Hello!", 0, ids=(None, "item_hi"), positions=(None, 5))
    assert [(m.id, m.role, m.text, m.positions) for m in session.history] == [("item_hi", "assistant", "Hello!", 5)]
    speech = pcm(0.3, seed=3)
    session = await store.append_turn("acme", session.id, speech, "Two.", 1, ids=("item_u", "item_a"))
    got = await store.get_session("acme", session.id)
    assert [(m.id, m.role) for m in got.history] == [("item_hi", "assistant"), ("item_u", "user"), ("item_a", "assistant")]
    assert got.version == 2 and await store.load_history_audio(got) == [None, speech, None]


async def test_caller_audio_is_kept_losslessly_and_compactly(store, redis_db):
    session = await store.create_session("acme", (await new_voice(store)).id)
    speech = (0.3 * np.sin(np.arange(48000) * 2 * np.pi * 180 / 16000) * 32767).astype("<i2").tobytes()
    session = await store.append_turn("acme", session.id, speech, "One.", 0, ids=("item_u", "item_a"),
                                      positions=(90, 7))
    stored = await redis_db.hget(store._session_keys("acme", session.id)[1], "item_u")
    assert stored.startswith(b"fLaC") and len(stored) < len(speech) / 2  # FLAC: a fraction of the PCM
    assert await store.load_audio("acme", session.id, ["item_u"]) == {"item_u": speech}  # the very samples
    user, reply = session.history
    assert (user.id, user.audio_bytes, user.audio_id, user.positions) == ("item_u", 96000, audio_digest(speech), 90)
    assert (reply.id, reply.positions) == ("item_a", 7)
    # A session stored before FLAC and before message ids: its audio, raw PCM16 under the message's index.
    key, audio_key = store._session_keys("acme", session.id)
    old = json.loads(await redis_db.get(key))
    for message in old["history"]:
        del message["id"]
    await redis_db.set(key, json.dumps(old))
    await redis_db.hset(audio_key, "0", speech)
    legacy = await store.get_session("acme", session.id)
    assert [m.id for m in legacy.history] == ["0", "1"]
    assert await store.load_history_audio(legacy) == [speech, None]


async def test_a_turn_commits_what_truncation_dropped_and_deletes_are_recorded(store, redis_db):
    session = await store.create_session("acme", (await new_voice(store)).id)
    for n in range(3):
        session = await store.append_turn("acme", session.id, pcm(0.2, seed=n), f"r{n}", n, ids=(f"u{n}", f"a{n}"),
                                          user_text="words" if n == 1 else None)
    _, audio_key = store._session_keys("acme", session.id)
    drop = HistoryDrop(messages=["u0", "a0", "gone-already"], audio=["u1"])
    session = await store.append_turn("acme", session.id, pcm(0.2, seed=9), "r3", 3, ids=("u3", "a3"), drop=drop)
    assert [m.id for m in session.history] == ["u1", "a1", "u2", "a2", "u3", "a3"]
    assert session.history[0].text == "words" and session.history[0].audio_bytes == 0
    assert sorted(k.decode() for k in await redis_db.hkeys(audio_key)) == ["u2", "u3"]  # dropped audio left Redis
    assert session.dropped.messages == 2 and session.dropped.caller_audio == 2
    assert session.dropped.item_ids == ["u0", "a0"] and session.version == 4
    session = await store.delete_item("acme", session.id, "u2")
    assert [m.id for m in session.history] == ["u1", "a1", "a2", "u3", "a3"] and session.version == 4
    assert session.dropped.deleted == 1 and session.dropped.item_ids[-1] == "u2"
    assert sorted(k.decode() for k in await redis_db.hkeys(audio_key)) == ["u3"]
    with pytest.raises(NotFound, match="item 'u2'"):
        await store.delete_item("acme", session.id, "u2")
    assert await store.get_session("acme", session.id) == session


async def test_concurrent_appends_exactly_one_wins(store, redis_db):
    session = await store.create_session("acme", (await new_voice(store)).id)
    results = await asyncio.gather(
        *(store.append_turn("acme", session.id, pcm(0.2, seed=i), f"reply {i}", expected_version=0) for i in range(4)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, VersionConflict) for r in results if r is not winners[0])

    got = await store.get_session("acme", session.id)
    assert got == winners[0] and got.version == 1 and len(got.history) == 2  # one turn: user + assistant
    winner = results.index(winners[0])
    assert got.history[1].text == f"reply {winner}"
    assert await store.load_history_audio(got) == [pcm(0.2, seed=winner), None]
    assert await redis_db.hlen(store._session_keys("acme", session.id)[1]) == 1  # losers wrote no audio either

    with pytest.raises(VersionConflict):  # a turn built on the old history
        await store.append_turn("acme", session.id, pcm(0.1), "stale", expected_version=0)
    assert await store.get_session("acme", session.id) == got


async def test_reads_during_a_commit_do_not_fail_it(store, redis_db):
    """Reading a session refreshes its TTL, which WATCH counts as a write: a commit that a read (a client polling
    the session) overlapped reads again instead of failing with version_conflict. Seen on a live call."""
    session = await store.create_session("acme", (await new_voice(store)).id)
    key = store._session_keys("acme", session.id)[0]
    reads = []
    real_get = store.redis.pipeline

    def pipeline(*args, **kwargs):
        pipe = real_get(*args, **kwargs)
        execute = pipe.execute

        async def read_first():
            if len(reads) < 2:  # the first two attempts each see a read land before their EXEC
                reads.append(await redis_db.getex(key, ex=60))
            return await execute()

        pipe.execute = read_first
        return pipe

    store.redis.pipeline = pipeline
    try:
        got = await store.append_turn("acme", session.id, pcm(0.2), "reply", expected_version=0)
    finally:
        del store.redis.pipeline
    assert len(reads) == 2 and got.version == 1
    assert (await store.get_session("acme", session.id)).history[1].text == "reply"


async def test_cancelled_append_is_all_or_nothing(store, redis_db):
    """Cancel a commit after 0, 1, 2, ... loop iterations, until one finishes first: each time the session is
    either untouched or holds the whole turn (document and audio), never half of it. (On Python 3.11 a cancel
    can also be swallowed by asyncio.wait_for inside redis-py, and the turn then commits whole.)"""
    session = await store.create_session("acme", (await new_voice(store)).id)
    _, audio_key = store._session_keys("acme", session.id)
    cancelled_midway = 0
    for delay in range(1000):
        audio = pcm(0.1, seed=delay)
        task = asyncio.create_task(store.append_turn("acme", session.id, audio, f"r{delay}", session.version))
        for _ in range(delay):
            await asyncio.sleep(0)
        finished_first = task.done()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        before, session = session, await store.get_session("acme", session.id)
        if session.version == before.version:
            assert session == before and await redis_db.hlen(audio_key) == len(before.history) // 2
            cancelled_midway += delay > 0
        else:
            assert session.version == before.version + 1 and session.history[:-2] == before.history
            assert session.history[-1].text == f"r{delay}"
            assert (await store.load_history_audio(session))[-2] == audio
        if finished_first:
            break
    else:
        pytest.fail("the append never finished before its cancel")
    assert cancelled_midway > 0


async def test_session_ttl_is_set_and_refreshed(store, redis_db):
    session = await store.create_session("acme", (await new_voice(store)).id)
    key, audio_key = store._session_keys("acme", session.id)
    assert 0 < await redis_db.ttl(key) <= TTL_S

    await store.append_turn("acme", session.id, pcm(0.1), "hi", expected_version=0)
    assert 0 < await redis_db.ttl(audio_key) <= TTL_S

    # Pretend most of the TTL has passed; using the session starts it again for both keys.
    for use in (store.get_session("acme", session.id),
                store.append_turn("acme", session.id, pcm(0.1), "again", expected_version=1)):
        await redis_db.pexpire(key, 1000)
        await redis_db.pexpire(audio_key, 1000)
        await use
        assert await redis_db.pttl(key) > 3000 and await redis_db.pttl(audio_key) > 3000

    await redis_db.pexpire(key, 20)
    await redis_db.pexpire(audio_key, 20)
    await asyncio.sleep(0.1)
    with pytest.raises(NotFound):
        await store.get_session("acme", session.id)


@pytest.mark.parametrize("crash", [False, True], ids=["clean-stop", "kill-9"])
async def test_state_survives_a_redis_restart(tmp_path, crash):
    settings = StateSettings(session_ttl_s=TTL_S)
    port = free_port()
    proc = start_local_redis(tmp_path, port)
    client = redis.asyncio.Redis(port=port)
    store = StateStore(client, settings)
    try:
        voice = await new_voice(store)
        session = await store.create_session("acme", voice.id, "Be brief.", ReplyFormat.WAV)
        session = await store.append_turn("acme", session.id, pcm(0.4), "Hello.", expected_version=0)
    finally:
        await client.aclose()
        if crash:  # with appendfsync always every acknowledged write is already on disk
            proc.kill()
            proc.wait()
        else:
            stop_local_redis(proc)

    port = free_port()
    proc = start_local_redis(tmp_path, port)
    client = redis.asyncio.Redis(port=port)
    store = StateStore(client, settings)
    try:
        got_voice = await store.get_voice("acme", voice.id)
        assert got_voice == voice
        np.testing.assert_array_equal(got_voice.codes_array(), make_codes())
        got = await store.get_session("acme", session.id)
        assert got == session
        assert await store.load_history_audio(got) == [pcm(0.4), None]
    finally:
        await client.aclose()
        stop_local_redis(proc)


async def test_a_server_that_does_not_fsync_every_write_is_refused(tmp_path):
    """On `appendfsync everysec` an acknowledged voice could be lost in a crash: the store will not write it."""
    port = free_port()
    proc = start_local_redis(tmp_path, port, appendfsync="everysec")
    client = redis.asyncio.Redis(port=port)
    try:
        with pytest.raises(StateUnavailable, match="appendfsync always") as refused:
            await new_voice(StateStore(client, StateSettings()))
        assert refused.value.code == "state_not_durable"
        assert await client.keys("*") == []  # nothing was written
        trusting = StateStore(client, StateSettings(require_fsync=False))
        assert (await new_voice(trusting)).id.startswith("voice_")
    finally:
        await client.aclose()
        stop_local_redis(proc)


async def test_the_store_client_rides_out_a_redis_restart(tmp_path):
    """Every pooled connection is stale after a restart; `redis_client` retries instead of failing requests."""
    port = free_port()
    settings = StateSettings(redis_url=f"redis://127.0.0.1:{port}/0", session_ttl_s=TTL_S)
    proc = start_local_redis(tmp_path, port)
    client = redis_client(settings)
    store = StateStore(client, settings)
    try:
        voice = await new_voice(store)
        session = await store.create_session("acme", voice.id, "Be brief.", ReplyFormat.WAV)
        await asyncio.gather(*(store.get_voice("acme", voice.id) for _ in range(4)))  # several pooled connections
        stop_local_redis(proc)
        proc = start_local_redis(tmp_path, port)
        got = await asyncio.gather(store.get_voice("acme", voice.id), store.get_session("acme", session.id))
        assert got == [voice, session]
        saved = await store.append_turn("acme", session.id, pcm(0.4), "Hello.", expected_version=0)  # WATCH/MULTI
        assert saved.version == 1
    finally:
        await client.aclose()
        stop_local_redis(proc)


async def test_local_redis_fails_clearly_on_a_taken_port(tmp_path, redis_port):
    with pytest.raises(RuntimeError, match="redis-server exited"):
        start_local_redis(tmp_path, redis_port)


async def test_tenant_directory(tmp_path, monkeypatch):
    keys = {"key-acme": "acme", "key-globex": "globex"}
    monkeypatch.setenv("CHROMA_API_KEYS", json.dumps(keys))
    from_env = TenantDirectory.from_settings()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    from_file = TenantDirectory.from_settings(TenantSettings(api_keys=str(path)))
    for directory in (from_env, from_file):
        assert directory.tenant_for("key-acme") == "acme"
        assert directory.tenant_for("key-globex") == "globex"
        for wrong in ("key-acm", "key-acme ", "", None):
            assert directory.tenant_for(wrong) is None

    monkeypatch.delenv("CHROMA_API_KEYS")
    assert TenantDirectory.from_settings().tenant_for("key-acme") is None
    with pytest.raises(ValueError):
        TenantDirectory.from_settings(TenantSettings(api_keys='["key-acme"]'))
    with pytest.raises(ValueError):
        TenantDirectory({"": "acme"})
