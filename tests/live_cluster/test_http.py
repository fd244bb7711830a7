"""The serving cluster end to end over HTTP (the package's conftest brings the cluster up)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from cluster.local.supervisor import start_redis, stop_redis
from model.processing.audio import decode_audio, encode_wav
from model.processing.processor import Conversation, Message
from tests.live_cluster.conftest import (
    KEYS,
    MAX_FRAMES,
    MAX_SLOTS,
    caller,
    client,
    new_session,
    offline_voice,
    reference_clip,
    slots_in_use,
    wait_for_no_slots_in_use,
)

pytestmark = pytest.mark.vllm


async def test_cluster_is_up_and_ready(cluster):
    async with httpx.AsyncClient(base_url=cluster["url"]) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        spec = (await http.get("/openapi.json")).json()
    assert "chroma_turn_ttfa_seconds" in metrics and "chroma_live_turns" in metrics
    # The OpenAPI document, as the running cluster serves it: every route with its request and response schemas.
    assert {"/v1/voices", "/v1/voices/{voice_id}", "/v1/sessions", "/v1/sessions/{session_id}",
            "/v1/sessions/{session_id}/turns", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert any("content" in r for r in operation["responses"].values()), (method, path)
            if method == "post":
                assert operation["requestBody"]["content"], (method, path)


async def test_two_turns_stream_and_keep_history(cluster, chroma):
    async with client(cluster) as api:
        _, session = await new_session(api)
        replies = []
        for turn in range(2):
            events = [(event, data) async for event, data, _ in api.turn_events(session["id"], caller(3 + turn), 16000)]
            kinds = [event for event, _ in events]
            assert kinds[-1] == "done", events[-1]
            assert kinds.count("audio") >= 2  # streamed in chunks, all before the turn ended
            done = events[-1][1]
            pcm_bytes = sum(len(base64.b64decode(d["data"])) for e, d in events if e == "audio")
            assert done["frames"] > 0 and pcm_bytes == done["frames"] * 1920 * 2  # PCM16 at 24 kHz
            assert done["session_version"] == turn + 1
            replies.append(done)
        history = (await api.http.get(f"/v1/sessions/{session['id']}")).json()["history"]
    assert [h["role"] for h in history] == ["user", "assistant", "user", "assistant"]
    assert [history[1]["text"], history[3]["text"]] == [r["text"] for r in replies]
    # The second turn was answered in the context of the first: it equals the offline reply to the whole dialogue.
    dialogue = [Message("user", audio=caller(3), sample_rate=16000)]
    if replies[0]["text"]:
        dialogue.append(Message("assistant", text=replies[0]["text"]))
    dialogue.append(Message("user", audio=caller(4), sample_rate=16000))
    expected = chroma.reply(Conversation("Be brief.", dialogue), offline_voice(chroma, "A voice for the cluster.", 1), max_frames=MAX_FRAMES)
    assert (replies[1]["text"], replies[1]["frames"]) == (expected.text, expected.frames.shape[0])


async def test_concurrent_turns_equal_their_single_turn_replies(cluster):
    async with client(cluster) as api:
        voice, _ = await new_session(api, seed=4)
        sessions = [await api.create_session(voice["id"], system_prompt="Be brief.") for _ in range(8)]
        alone = [await api.turn(sessions[i]["id"], caller(10 + i), 16000) for i in range(4)]
        together = await asyncio.gather(*(api.turn(sessions[4 + i]["id"], caller(10 + i), 16000) for i in range(4)))
    for single, batched in zip(alone, together):
        assert batched.text == single.text
        assert batched.done["frames"] == single.done["frames"]
        # The codec decodes a batch with other kernels' summation order: PCM16 may differ by a rounding step.
        np.testing.assert_allclose(batched.samples.astype(np.int32), single.samples.astype(np.int32), atol=2)


async def test_the_cluster_reply_equals_the_offline_reply(cluster, chroma):
    """vLLM's hidden states differ from transformers' by ~1e-6, not enough to change a greedy frame."""
    transcript = "The offline voice."
    async with client(cluster) as api:
        voice = await api.create_voice("offline", transcript, reference_clip(21, 1.0), 24000)
        session = await api.create_session(voice["id"], system_prompt="Be brief.")
        reply = await api.turn(session["id"], caller(22), 16000)
    expected = chroma.reply(
        Conversation("Be brief.", [Message("user", audio=caller(22), sample_rate=16000)]),
        offline_voice(chroma, transcript, 21, 1.0), max_frames=MAX_FRAMES,
    )
    assert reply.done["frames"] == expected.frames.shape[0]
    assert reply.text == expected.text
    want = np.round(np.clip(expected.audio.numpy(), -1.0, 1.0) * 32767.0)  # PCM16 as the server encodes it
    np.testing.assert_allclose(reply.samples.astype(np.float64), want, atol=2)


async def test_a_caller_who_hangs_up_frees_every_slot(cluster):
    async with client(cluster) as api:
        _, session = await new_session(api, seed=5)
        async with contextlib.aclosing(api.turn_events(session["id"], caller(30, 2.0), 16000)) as events:
            async for event, _, _ in events:
                if event == "audio":
                    break  # closing the stream hangs up mid-reply
        for _ in range(5):  # cancellation travels down the chain asynchronously
            in_use = await asyncio.to_thread(slots_in_use, cluster)
            if not any(in_use.values()):
                break
            await asyncio.sleep(1.0)
        assert in_use == dict.fromkeys(in_use, 0)
        state = (await api.http.get(f"/v1/sessions/{session['id']}")).json()
    assert state["history"] == [] and state["version"] == 0  # the cancelled turn wrote nothing


async def test_at_capacity_the_refusal_through_ray_is_clean(cluster):
    """Every place taken (admission control counts the speech slots): the next turn's 503 body names the problem
    and nothing internal. Three times the places are offered at once: a turn that may wait in line for a place
    freed within its TTFA budget (a short random-weight reply frees one soon) gets it, so two more are not enough."""
    async with client(cluster) as api:
        voice, _ = await new_session(api, seed=8)
        sessions = [await api.create_session(voice["id"]) for _ in range(3 * MAX_SLOTS)]
        body = encode_wav(caller(50, 2.0), 16000)

        async def open_turn(session):
            request = api.http.build_request("POST", f"/v1/sessions/{session['id']}/turns", content=body,
                                             headers={"Content-Type": "audio/wav", "Accept": "text/event-stream"})
            return await api.http.send(request, stream=True)

        pending = {asyncio.create_task(open_turn(s)) for s in sessions}
        opened, refused = [], None
        try:
            while pending and refused is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    response = task.result()
                    opened.append(response)
                    if response.status_code == 503:
                        refused = response
            assert refused is not None
            text = (await refused.aread()).decode()
            error = json.loads(text)["error"]
            assert error["code"] == "over_capacity" and refused.headers["retry-after"] == "1"
            assert "at capacity" in error["message"] and error["request_id"] and error["retryable"]
            for internal in ("Traceback", "ray::", "ServeReplica", "File \"", "pid=", "ActorID", ".py", "127.0.0.1"):
                assert internal not in text, internal
        finally:
            for task in pending:
                task.cancel()
            for response in opened:
                await response.aclose()
    in_use = await wait_for_no_slots_in_use(cluster)
    assert in_use == dict.fromkeys(in_use, 0)


async def test_bad_requests_get_clear_errors(cluster):
    async with client(cluster) as api, client(cluster, "key-other") as other:
        voice, session = await new_session(api, seed=6)
        turns = f"/v1/sessions/{session['id']}/turns"

        async def error(reply: httpx.Response, status: int) -> str:
            assert reply.status_code == status, reply.text
            return reply.json()["error"]["code"]

        await error(await api.http.get("/v1/voices/voice_" + "0" * 32), 404)
        await error(await api.http.get("/v1/sessions/sess_" + "0" * 32), 404)
        await error(await api.http.post("/v1/sessions/sess_" + "0" * 32 + "/turns", content=encode_wav(caller(1), 16000),
                                        headers={"Content-Type": "audio/wav"}), 404)
        # another tenant's ids do not exist for this tenant
        await error(await other.http.get(f"/v1/voices/{voice['id']}"), 404)
        await error(await other.http.get(f"/v1/sessions/{session['id']}"), 404)
        await error(await other.http.post(turns, content=encode_wav(caller(1), 16000), headers={"Content-Type": "audio/wav"}), 404)
        # corrupt, unsupported and oversize audio
        corrupt = b"RIFF\x10\x00\x00\x00WAVEfmt garbage" + bytes(200)
        assert (await api.http.post(turns, content=corrupt, headers={"Content-Type": "audio/wav"})).status_code in (415, 422)
        await error(await api.http.post(turns, content=b"\x00" * 100, headers={"Content-Type": "video/mp4"}), 415)
        oversize = bytes(11 * 2**20)
        await error(await api.http.post(turns, content=oversize, headers={"Content-Type": "audio/wav"}), 413)
        # no key, wrong key
        async with httpx.AsyncClient(base_url=cluster["url"]) as anonymous:
            await error(await anonymous.get("/v1/voices"), 401)
            await error(await anonymous.get("/v1/voices", headers={"Authorization": "Bearer nope"}), 401)
        # none of it changed the session
        state = (await api.http.get(f"/v1/sessions/{session['id']}")).json()
    assert state["history"] == [] and state["version"] == 0


async def test_restarting_redis_between_turns_loses_nothing(cluster):
    settings = cluster["settings"]
    async with client(cluster) as api:
        voice, session = await new_session(api, seed=7)
        await api.turn(session["id"], caller(40), 16000)
        stop_redis(settings)
        down_reply = await api.http.get(f"/v1/sessions/{session['id']}")  # while Redis is down: 503, not a hang
        assert down_reply.status_code == 503 and down_reply.json()["error"]["code"] == "state_unavailable"
        start_redis(settings)
        assert (await api.http.get(f"/v1/voices/{voice['id']}")).status_code == 200
        reply = await api.turn(session["id"], caller(41), 16000)
        assert reply.done["session_version"] == 2
        state = (await api.http.get(f"/v1/sessions/{session['id']}")).json()
    assert [h["role"] for h in state["history"]] == ["user", "assistant", "user", "assistant"]


def test_the_demo_answers_a_spoken_turn(cluster, tmp_path):
    out = tmp_path / "reply.wav"
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "demo", "--url", cluster["url"], "--api-key", "key-acme", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "time to first audio" in done.stdout and "real-time factor" in done.stdout
    audio, rate = decode_audio(out.read_bytes())
    frames = int(done.stdout.split("audio:")[1].split("frames")[0])
    assert rate == 24000 and 0 < frames <= MAX_FRAMES and audio.size == frames * 1920


def test_locust_phone_calls_run_against_the_cluster(cluster, tmp_path):
    """The load-test users (mu-law 8 kHz in and out, barge-in, hang-up) work end to end; timings not asserted."""
    import csv
    import importlib.util

    if importlib.util.find_spec("locust") is None:  # not imported here: locust monkey-patches the process with gevent
        pytest.fail("locust is not installed (`make setup` installs the dev extras)")

    env = {**os.environ, "CHROMA_API_KEY": "key-acme"}
    subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--host", cluster["url"], "--headless",
         "--users", "2", "--spawn-rate", "2", "--run-time", "20s", "--csv", str(tmp_path / "run"), "--only-summary"],
        env=env, capture_output=True, text=True, timeout=120, check=False,  # exits 1 when a reply ran dry
    )
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    turns = rows[("POST", "/v1/sessions/[id]/turns")]
    assert int(turns["Request Count"]) >= 2 and int(turns["Failure Count"]) == 0
    assert int(rows[("TTFA", "first audio")]["Request Count"]) >= 2
    for (kind, name), row in rows.items():
        if kind not in ("UNDERRUN", "") and name != "Aggregated":
            assert int(row["Failure Count"]) == 0, (kind, name)


SCHEMATHESIS_EXAMPLES = 12  # per operation and tenant: 9 operations x 2 tenants


def test_schemathesis_finds_no_server_error_and_no_schema_violation(cluster):
    """The OpenAPI document the running cluster serves, driven by schemathesis with every tenant's key: every
    answer is a documented one in its documented shape, never a 5xx, and no error body carries internals."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    @schemathesis.serializer("audio/wav", "audio/flac", "audio/ogg", "audio/pcm", "audio/basic")
    def audio_body(context, value):  # a turn's body is raw audio bytes (`format: binary`), as generated
        return {"data": value if isinstance(value, bytes) else str(value).encode()}

    schema = schemathesis.openapi.from_url(f"{cluster['url']}/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    failures, statuses = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        for key in KEYS:
            @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def exercise(case):
                response = case.call(base_url=cluster["url"], headers={"Authorization": f"Bearer {key}"}, timeout=120)
                statuses.append(response.status_code)
                try:
                    case.validate_response(response, checks=checks)
                except Exception as failure:  # noqa: BLE001 - every failure is collected and reported below
                    failures.append(f"{operation.label} -> {response.status_code}: {str(failure)[:300]}")
                if response.status_code >= 400:
                    text = response.text
                    for internal in ("Traceback", "ray::", "ServeReplica", 'File "', "ActorID", ".py\""):
                        if internal in text:
                            failures.append(f"{operation.label}: {internal!r} in the error body")

            exercise()
    print(f"\nschemathesis: {len(statuses)} cases, statuses {sorted(set(statuses))}")
    assert len(statuses) >= 9 * len(KEYS)
    assert failures == []
