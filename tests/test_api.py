"""The HTTP API end to end: real redis-server, the tiny RANDOM-WEIGHT checkpoint, LocalTurnBackend in process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid

import httpx
import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio
import torch

from cluster.admission.stages import StageStatus
from cluster.api.app import build_api
from cluster.pipeline import turn as pipeline
from cluster.pipeline.history import TurnPlan
from cluster.pipeline.local import LocalTurnBackend
from cluster.settings import AppConfig
from cluster.settings.admission import AdmissionSettings
from cluster.settings.api import ApiSettings
from cluster.settings.state import StateSettings
from cluster.settings.tenants import TenantQuota
from cluster.settings.turns import HistorySettings
from model.chroma.turn import VoicePrompt
from cluster.state.ledger import AdmissionLedger
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory
from model.processing.audio import encode_mulaw, encode_wav, resample
from model.testing.speech import synthetic_speech
from model.engines.realtime import Headroom
from model.engines.speech import CapacityError
from model.errors import StageFailed
from tests.conftest import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_FRAMES = 12
FRAME = 1920  # samples per frame at 24 kHz
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"X-API-Key": "key-globex"}
KEYS = {"key-acme": "acme", "key-globex": "globex"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(redis_port):
    client = redis.asyncio.Redis(port=redis_port)
    yield StateStore(client, StateSettings(key_prefix=f"t{uuid.uuid4().hex[:8]}"))
    await client.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def backend(tiny_checkpoint, store):
    backend = LocalTurnBackend.from_config(AppConfig(
        checkpoint={"path": str(tiny_checkpoint)}, reasoner={"engine": "hf"},
        # Bounded by slots alone: these tests need two turns at once, whatever this machine's step times say
        # (test_capacity_is_what_the_engines_keep_real_time covers the measured bound).
        speech={"max_slots": 2, "max_queue": 2, "max_step_rtf": None}, codec={"max_streams": 4, "max_step_rtf": None},
        turns={"max_frames": MAX_FRAMES, "max_tokens": 32},
    ), state=store)
    yield backend
    await backend.close()


@contextlib.asynccontextmanager
async def client_for(app, **transport):
    """An HTTP client of `app`, run with its lifespan (as Serve runs it: admission control stops with it)."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **transport), base_url="http://test",
                                     timeout=60) as client:
            yield client


@pytest_asyncio.fixture(loop_scope="session")
async def client(store, backend):
    async with client_for(build_api(store, TenantDirectory(KEYS), backend, ApiSettings())) as client:
        yield client


def voice_wav(seed: int = 0) -> bytes:
    return encode_wav(synthetic_speech(24000, 1.2, seed=seed), 24000)


def caller_wave(seed: int = 1, seconds: float = 0.8) -> np.ndarray:
    return synthetic_speech(16000, seconds, seed=seed)


async def make_voice(client, headers=ACME) -> dict:
    files = {"audio": ("ref.wav", voice_wav(), "audio/wav")}
    response = await client.post("/v1/voices", headers=headers, files=files, data={"transcript": "Hello there, this is me.", "name": "Ada"})
    assert response.status_code == 201, response.text
    return response.json()


async def make_session(client, voice_id: str, headers=ACME, **extra) -> dict:
    response = await client.post("/v1/sessions", headers=headers, json={"voice_id": voice_id, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


async def test_voice_session_and_two_turns(client, backend, monkeypatch):
    voice = await make_voice(client)
    assert voice["id"].startswith("voice_") and voice["name"] == "Ada" and "codes" not in voice
    assert voice["num_codebooks"] == 8 and 0 < voice["valid_frames"] <= voice["num_frames"]
    listed = (await client.get("/v1/voices", headers=ACME)).json()["voices"]
    assert voice["id"] in [v["id"] for v in listed]
    assert (await client.get(f"/v1/voices/{voice['id']}", headers=ACME)).json() == voice

    session = await make_session(client, voice["id"], system_prompt="You are a phone agent.")
    assert session["output_format"] == "pcm16_24k" and session["history"] == [] and session["version"] == 0

    conversations = []
    stream = backend.reasoner.stream
    monkeypatch.setattr(backend.reasoner, "stream", lambda c, *a: conversations.append(c) or stream(c, *a))

    first_audio = caller_wave(seed=1)
    response = await client.post(
        f"/v1/sessions/{session['id']}/turns", headers={**ACME, "Accept": "text/event-stream"},
        content=encode_wav(first_audio, 16000), timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and "error" not in kinds
    assert kinds.count("audio") >= 2
    done = events[-1][1]
    assert 0 < done["frames"] <= MAX_FRAMES and done["ttfa_ms"] > 0 and done["rtf"] > 0
    audio = b"".join(base64.b64decode(data["data"]) for kind, data in events if kind == "audio")
    assert len(audio) == done["frames"] * FRAME * 2  # PCM16 at 24 kHz: no resampling, no tail
    assert "".join(data["delta"] for kind, data in events if kind == "text") == done["text"]
    assert done["session_version"] == 1

    history = (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["history"]
    assert [h["role"] for h in history] == ["user", "assistant"] and history[1]["text"] == done["text"]

    # Second turn, raw PCM16 24 kHz reply, caller audio as raw PCM16 16 kHz
    second_audio = caller_wave(seed=2, seconds=0.6)
    pcm = np.round(second_audio * 32767).astype("<i2").tobytes()
    response = await client.post(
        f"/v1/sessions/{session['id']}/turns", content=pcm, timeout=120,
        headers={**ACME, "Content-Type": "audio/pcm;rate=16000", "Accept": "audio/pcm;rate=24000"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/pcm;rate=24000"
    assert len(response.content) > 0 and len(response.content) % (FRAME * 2) == 0
    assert len(response.content) <= MAX_FRAMES * FRAME * 2

    # The second turn's conversation carried the first turn: its caller audio and (if any) its reply text.
    assert len(conversations) == 2
    turns = conversations[1].messages
    assert conversations[1].system_prompt == "You are a phone agent."
    expected = 3 if done["text"] else 2
    assert len(turns) == expected and [t.role for t in turns][-1] == "user"
    assert turns[0].role == "user" and turns[0].sample_rate == 16000
    np.testing.assert_allclose(turns[0].audio, first_audio, atol=2e-4)
    if done["text"]:
        assert turns[1].role == "assistant" and turns[1].text == done["text"]
    np.testing.assert_allclose(turns[-1].audio, second_audio, atol=2e-4)

    session = (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()
    assert len(session["history"]) == 4 and session["version"] == 2
    assert session["history"][2]["audio_bytes"] == len(pcm)

    metrics = (await client.get("/metrics")).text
    assert "chroma_turn_ttfa_seconds_bucket" in metrics and "chroma_turn_rtf_bucket" in metrics
    assert "chroma_live_turns 0.0" in metrics and "chroma_turns_waiting 0.0" in metrics
    assert 'chroma_turns_total{outcome="completed"} 2.0' in metrics
    frames_line = next(line for line in metrics.splitlines() if line.startswith("chroma_frames_total"))
    assert float(frames_line.split()[1]) >= done["frames"] + 1

    assert (await client.delete(f"/v1/sessions/{session['id']}", headers=ACME)).status_code == 204
    assert_error(await client.get(f"/v1/sessions/{session['id']}", headers=ACME), 404, "not_found")
    assert (await client.delete(f"/v1/voices/{voice['id']}", headers=ACME)).status_code == 204
    assert_error(await client.get(f"/v1/voices/{voice['id']}", headers=ACME), 404, "not_found")


async def test_mulaw_in_and_wav_or_mulaw_out(client):
    voice = await make_voice(client)
    session = await make_session(client, voice["id"], output_format="mulaw_8k")
    mulaw = encode_mulaw(resample(caller_wave(seed=3, seconds=0.5), 16000, 8000))
    response = await client.post(
        f"/v1/sessions/{session['id']}/turns", content=mulaw, timeout=120,
        headers={**ACME, "Content-Type": "audio/basic", "Accept": "audio/wav"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    assert response.content[:4] == b"RIFF" and response.content[8:12] == b"WAVE"
    assert (len(response.content) - 44) % (FRAME * 2) == 0 and len(response.content) > 44

    # SSE carries the session's format: mu-law at 8 kHz, one byte per sample, about frames * 640 in all
    response = await client.post(
        f"/v1/sessions/{session['id']}/turns", content=mulaw, timeout=120,
        headers={**ACME, "Content-Type": "audio/basic", "Accept": "text/event-stream"},
    )
    events = parse_sse(response.text)
    done = events[-1][1]
    audio = b"".join(base64.b64decode(d["data"]) for k, d in events if k == "audio")
    assert {d["format"] for k, d in events if k == "audio"} == {"mulaw_8k"}
    assert abs(len(audio) - done["frames"] * FRAME // 3) <= 2


async def test_auth_and_tenants(client):
    voice = await make_voice(client)
    session = await make_session(client, voice["id"])
    assert_error(await client.get("/v1/voices"), 401, "unauthorized")
    assert_error(await client.get("/v1/voices", headers={"Authorization": "Bearer nope"}), 401)
    assert_error(await client.post(f"/v1/sessions/{session['id']}/turns", content=b"x"), 401)
    assert (await client.get("/v1/voices", headers={"X-API-Key": "key-acme"})).status_code == 200

    # Another tenant sees nothing of acme's: 404, never 403
    assert_error(await client.get(f"/v1/voices/{voice['id']}", headers=GLOBEX), 404, "not_found")
    assert_error(await client.delete(f"/v1/voices/{voice['id']}", headers=GLOBEX), 404)
    assert_error(await client.get(f"/v1/sessions/{session['id']}", headers=GLOBEX), 404)
    assert_error(await client.post("/v1/sessions", headers=GLOBEX, json={"voice_id": voice["id"]}), 404)
    response = await client.post(
        f"/v1/sessions/{session['id']}/turns", headers={**GLOBEX, "Content-Type": "audio/wav"},
        content=encode_wav(caller_wave(), 16000),
    )
    assert_error(response, 404, "not_found")
    assert voice["id"] not in [v["id"] for v in (await client.get("/v1/voices", headers=GLOBEX)).json()["voices"]]

    # Unknown ids
    assert_error(await client.get("/v1/voices/voice_" + "0" * 32, headers=ACME), 404)
    assert_error(await client.get("/v1/voices/whatever", headers=ACME), 404)
    assert_error(await client.get("/v1/sessions/sess_" + "0" * 32, headers=ACME), 404)
    assert_error(await client.post("/v1/sessions/sess_nope/turns", headers={**ACME, "Content-Type": "audio/wav"},
                                   content=encode_wav(caller_wave(), 16000)), 404)
    assert_error(await client.get("/v1/nothing", headers=ACME), 404)


async def test_bad_requests(store, client):
    voice = await make_voice(client)
    session = await make_session(client, voice["id"])
    turns = f"/v1/sessions/{session['id']}/turns"
    wav = encode_wav(caller_wave(), 16000)

    error = assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/wav"}, content=b"RIFF\x00\x00\x00\x00WAVEjunk"), 422, "invalid_audio")
    assert "WAV" in error["message"]
    assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/wav"}, content=b"not audio at all"), 422, "invalid_audio")
    error = assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/wav"}, content=b""), 422)
    assert "empty" in error["message"]
    assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/pcm;rate=16000"}, content=b"\x01\x02\x03"), 422)
    error = assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/pcm"}, content=b"\x00\x00"), 422)
    assert "rate" in error["message"]
    assert_error(await client.post(turns, headers={**ACME, "Content-Type": "text/plain"}, content=wav), 415, "unsupported_media_type")
    assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/wav", "Accept": "application/json"}, content=wav), 406)

    assert_error(await client.post("/v1/sessions", headers=ACME, json={"voice_id": voice["id"], "output_format": "mp3"}), 422)
    assert_error(await client.post("/v1/sessions", headers=ACME, content=b"{not json"), 422)
    assert_error(await client.post("/v1/voices", headers=ACME, json={"name": "x"}), 415)
    response = await client.post("/v1/voices", headers=ACME, data={"transcript": "hi"}, files={"other": ("a", b"x")})
    assert_error(response, 422)
    response = await client.post("/v1/voices", headers=ACME, data={"transcript": "hi", "name": "n"},
                                 files={"audio": ("ref.wav", b"garbage", "audio/wav")})
    assert_error(response, 422, "invalid_audio")

    # The history was never touched by the failed turns, and none of them holds a place: a turn is admitted before
    # its audio is decoded, and one refused after that releases its place
    assert (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["version"] == 0
    assert await AdmissionLedger(store.redis, store.settings.key_prefix).live("turn") == 0


async def test_limits(store, backend):
    settings = ApiSettings(max_body_bytes=40_000, max_audio_seconds=0.5, max_voice_audio_seconds=1.0)
    async with client_for(build_api(store, TenantDirectory(KEYS), backend, settings)) as client:
        files = {"audio": ("ref.wav", encode_wav(synthetic_speech(16000, 1.1), 16000), "audio/wav")}
        error = assert_error(await client.post("/v1/voices", headers=ACME, files=files, data={"transcript": "hi", "name": "n"}), 413)
        assert "1.1 s" in error["message"]
        files = {"audio": ("ref.wav", encode_wav(synthetic_speech(16000, 0.9), 16000), "audio/wav")}
        response = await client.post("/v1/voices", headers=ACME, files=files, data={"transcript": "hello", "name": "n"})
        assert response.status_code == 201, response.text
        session = await make_session(client, response.json()["id"])
        turns = f"/v1/sessions/{session['id']}/turns"

        error = assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/wav"}, content=b"\0" * 50_000), 413, "body_too_large")
        assert "50000" in error["message"]

        async def chunked():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b"\0" * 8000

        assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/wav"}, content=chunked()), 413, "body_too_large")
        error = assert_error(await client.post(turns, headers={**ACME, "Content-Type": "audio/wav"},
                                               content=encode_wav(caller_wave(seconds=0.8), 16000)), 413, "audio_too_long")
        assert "0.8 s" in error["message"]


async def test_concurrent_turns_on_one_session_conflict(client):
    voice = await make_voice(client)
    session = await make_session(client, voice["id"])
    turns = f"/v1/sessions/{session['id']}/turns"

    async def turn(seed):
        response = await client.post(turns, headers={**ACME, "Content-Type": "audio/wav"},
                                     content=encode_wav(caller_wave(seed=seed, seconds=0.5), 16000), timeout=120)
        return parse_sse(response.text)[-1]

    outcomes = await asyncio.gather(turn(4), turn(5))
    assert sorted(kind for kind, _ in outcomes) == ["done", "error"]
    assert next(data for kind, data in outcomes if kind == "error")["error"]["code"] == "version_conflict"
    session = (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()
    assert session["version"] == 1 and len(session["history"]) == 2


async def test_client_disconnect_stops_the_turn(store, backend, client):
    voice = await make_voice(client)
    session = await make_session(client, voice["id"])
    app = build_api(store, TenantDirectory(KEYS), backend, ApiSettings())
    body = encode_wav(caller_wave(seed=6), 16000)
    gone = asyncio.Event()
    sent = []

    async def receive():
        if not sent:
            sent.append("body")
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    chunks = []

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            gone.set()  # hang up after the first chunk of reply audio

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": f"/v1/sessions/{session['id']}/turns", "raw_path": b"", "query_string": b"", "root_path": "",
        "headers": [(b"authorization", b"Bearer key-acme"), (b"content-type", b"audio/wav"),
                    (b"accept", b"audio/pcm;rate=24000"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1234), "server": ("test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 60)
    assert chunks and len(chunks[0]) % (FRAME * 2) == 0
    assert sum(len(c) for c in chunks) < MAX_FRAMES * FRAME * 2  # stopped before the whole reply
    for _ in range(200):  # slots are freed at once; the thinker stream closes on the engine's next turn
        if not backend.speech.turns and backend.codec.stats().open_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert backend.speech.turns == {} and backend.codec.stats().open_streams == 0
    assert (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["history"] == []
    assert "chroma_live_turns 0.0" in (metrics := (await client.get("/metrics")).text) and "chroma_turns_waiting 0.0" in metrics


class WholeHistory:
    """A stub backend's history policy: every turn reads the whole history."""

    settings = HistorySettings()

    def plan(self, session, user):
        return TurnPlan(user, session.history)

    def text_positions(self, role, text):
        return None


class StubBackend:
    history = WholeHistory()

    def __init__(self, ready=True, busy=False):
        self._ready, self.busy = ready, busy

    async def stages(self):
        return [StageStatus.of("Stub", Headroom(None), problem="" if self._ready else "stopped")]

    async def clone_voice(self, transcript, audio, sample_rate):
        return VoicePrompt(torch.tensor([1, 2, 3]), torch.ones((4, 8), dtype=torch.long), 4)

    async def run_turn(self, turn_id, voice, session, plan):
        if self.busy:
            raise CapacityError("no free slots")
        yield  # pragma: no cover


async def test_health_ready_capacity(store, client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE chroma_turn_ttfa_seconds histogram" in metrics.text

    async with client_for(build_api(store, TenantDirectory(KEYS), StubBackend(ready=False))) as stub:
        assert_error(await stub.get("/readyz"), 503, "not_ready")
    down = StateStore(redis.asyncio.Redis(port=free_port()), StateSettings())
    async with client_for(build_api(down, TenantDirectory(KEYS), StubBackend())) as stub:
        assert "redis" in assert_error(await stub.get("/readyz"), 503)["message"]
    await down.redis.aclose()

    async with client_for(build_api(store, TenantDirectory(KEYS), StubBackend(busy=True))) as stub:
        voice = await make_voice(stub)
        session = await make_session(stub, voice["id"])
        response = await stub.post(f"/v1/sessions/{session['id']}/turns", headers={**ACME, "Content-Type": "audio/wav"},
                                   content=encode_wav(caller_wave(), 16000))
        assert_error(response, 503, "over_capacity")
        assert response.headers["retry-after"] == "1"
        assert (await stub.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["version"] == 0


async def test_capacity_is_what_the_engines_keep_real_time(store, tiny_checkpoint):
    """Four slots, but no step of this machine fits the budget (a microsecond): measured at start, one turn at a
    time, and a second caller is refused at once rather than slowing the first one down."""
    backend = LocalTurnBackend.from_config(AppConfig(
        checkpoint={"path": str(tiny_checkpoint)}, reasoner={"engine": "hf"},
        speech={"max_slots": 4, "max_queue": 0, "max_step_rtf": 1e-6}, codec={"max_streams": 4, "max_step_rtf": None},
        turns={"max_frames": MAX_FRAMES, "max_tokens": 32},
    ), state=store)
    try:
        async with client_for(build_api(store, TenantDirectory(KEYS), backend)) as client:
            voice = await make_voice(client)
            sessions = [await make_session(client, voice["id"]) for _ in range(2)]
            speech = {s["name"]: s for s in (await client.get("/readyz")).json()["stages"]}["SpeechStack"]
            assert speech["capacity"] == 1  # calibrated before any turn: no batch fits, and one turn always may
            body = encode_wav(caller_wave(), 16000)
            first = await client.post(f"/v1/sessions/{sessions[0]['id']}/turns", headers=ACME, content=body)
            assert parse_sse(first.text)[-1][0] == "done"
            assert backend.speech.stats().step_ms_by_batch and backend.speech.realtime.capacity() == 1
            ready = (await client.get("/readyz")).json()
            assert ready["capacity"] == 1

            async def turn(session):
                return await client.post(f"/v1/sessions/{session['id']}/turns", headers=ACME, content=body)

            outcomes = await asyncio.gather(*(turn(s) for s in sessions))
            codes = sorted(r.json()["error"]["code"] if r.status_code != 200 else "done" for r in outcomes)
            metrics = (await client.get("/metrics")).text
            if codes == ["done", "done"]:  # the second waited for the first: its first audio still fit the budget
                assert 'chroma_admissions_total{kind="turn",outcome="queued"} 1.0' in metrics
            else:
                assert codes == ["done", "over_capacity"]
            assert set(backend.speech.stats().steps_by_batch) == {1}  # never two turns in one step
    finally:
        await backend.close()


async def test_openapi_document_describes_every_route(client):
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths) == {
        "/v1/voices", "/v1/voices/{voice_id}", "/v1/sessions", "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/turns", "/v1/sessions/{session_id}/history/{item_id}", "/healthz", "/readyz",
        "/metrics",
    }
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert "ErrorBody" in spec["components"]["schemas"]
    for path, methods in paths.items():
        for method, operation in methods.items():
            assert operation["responses"], (method, path)
            if path.startswith("/v1/"):
                assert operation.get("security"), (method, path)  # the auth scheme is part of the operation
                error = operation["responses"]["401"]["content"]["application/json"]["schema"]
                assert error["$ref"].endswith("/ErrorBody"), (method, path)
            if method == "post":
                assert operation["requestBody"]["content"], (method, path)
    turn = paths["/v1/sessions/{session_id}/turns"]["post"]
    streamed = set(turn["responses"]["200"]["content"])
    assert {"text/event-stream", "audio/pcm;rate=24000", "audio/pcm;rate=16000", "audio/basic", "audio/wav"} <= streamed
    assert {"audio/wav", "audio/basic"} <= set(turn["requestBody"]["content"])
    assert "multipart/form-data" in paths["/v1/voices"]["post"]["requestBody"]["content"]
    assert (await client.get("/docs")).status_code == 200


class FailingBackend(StubBackend):
    async def run_turn(self, turn_id, voice, session, plan):
        raise RuntimeError("/srv/secret/path.py exploded in actor 1234")
        yield  # pragma: no cover


async def test_internal_failures_are_500_with_a_request_id_and_no_internals(store):
    app = build_api(store, TenantDirectory(KEYS), FailingBackend())
    async with client_for(app, raise_app_exceptions=False) as stub:
        voice = await make_voice(stub)
        session = await make_session(stub, voice["id"])
        response = await stub.post(f"/v1/sessions/{session['id']}/turns", content=encode_wav(caller_wave(), 16000),
                                   headers={**ACME, "Content-Type": "audio/wav", "X-Request-Id": "req-abc123"})
        error = assert_error(response, 500, "internal_error")
        assert error["request_id"] == "req-abc123" == response.headers["x-request-id"]
        assert "req-abc123" in error["message"]
        assert "secret" not in response.text and "exploded" not in response.text and "Traceback" not in response.text
        assert (await stub.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["version"] == 0


async def test_a_fresh_backend_admits_what_its_calibrated_curve_allows_and_refuses_past_it(store, tiny_checkpoint):
    """Measured bound on (0.8 of each step's audio), before any turn: the engines calibrated at start, so capacity
    is already what this machine keeps real-time (more than one turn of the tiny model), and turns offered past it
    are refused at once (no line: a budget of 1 ms leaves no wait worth joining)."""
    backend = LocalTurnBackend.from_config(AppConfig(
        checkpoint={"path": str(tiny_checkpoint)}, reasoner={"engine": "hf"},
        speech={"max_slots": 4, "max_queue": 0, "max_step_rtf": 0.8}, codec={"max_streams": 4, "max_step_rtf": 0.8},
        turns={"max_frames": MAX_FRAMES, "max_tokens": 32},
    ), state=store)
    try:
        app = build_api(store, TenantDirectory(KEYS), backend, admission=AdmissionSettings(ttfa_budget_s=0.001))
        async with client_for(app) as client:
            voice = await make_voice(client)
            sessions = [await make_session(client, voice["id"]) for _ in range(6)]
            ready = (await client.get("/readyz")).json()
            speech = {s["name"]: s for s in ready["stages"]}["SpeechStack"]
            assert set(speech["step_ms_by_batch"]) == {"1", "2", "4"}  # the calibrated buckets, no turn yet
            assert ready["capacity"] == min(backend.speech.realtime.capacity(), backend.codec.engine.realtime.capacity())
            assert ready["capacity"] >= 2  # a step of the tiny model's 2 turns takes a few ms of its 64 ms
            body = encode_wav(caller_wave(), 16000)
            outcomes = await asyncio.gather(*(
                client.post(f"/v1/sessions/{s['id']}/turns", headers=ACME, content=body) for s in sessions))
            admitted = [r for r in outcomes if r.status_code == 200]
            refused = [r for r in outcomes if r.status_code != 200]
            assert 2 <= len(admitted) <= ready["capacity"]
            assert all(parse_sse(r.text)[-1][0] == "done" for r in admitted)
            assert len(refused) >= 6 - ready["capacity"] and {r.json()["error"]["code"] for r in refused} == {"over_capacity"}
    finally:
        await backend.close()


class FailingMidReply:
    """LocalTurnBackend's turns, but (while `failing`) the speech stage dies after the first audio chunk."""

    def __init__(self, backend):
        self.backend, self.failing = backend, True
        self.history = backend.history

    async def stages(self):
        return await self.backend.stages()

    async def clone_voice(self, transcript, audio, sample_rate):
        return await self.backend.clone_voice(transcript, audio, sample_rate)

    async def run_turn(self, *args):
        events = self.backend.run_turn(*args)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
                if self.failing and isinstance(event, pipeline.AudioChunk):
                    raise StageFailed("SpeechStack", died=True)


async def test_a_stage_dying_mid_reply_ends_the_reply_cleanly_and_leaves_the_session(store, backend):
    failing = FailingMidReply(backend)
    app = build_api(store, TenantDirectory(KEYS), failing, ApiSettings(), AdmissionSettings(stage_poll_s=0.05))
    admission = app.state.services.admission
    async with client_for(app) as client:
        voice = await make_voice(client)
        session = await make_session(client, voice["id"])
        turns = f"/v1/sessions/{session['id']}/turns"
        body = encode_wav(caller_wave(seed=7), 16000)
        response = await client.post(turns, headers={**ACME, "Accept": "text/event-stream"}, content=body)
        events = parse_sse(response.text)
        assert response.status_code == 200 and [k for k, _ in events][-1] == "error" and "audio" in dict(events)
        error = events[-1][1]["error"]
        assert error["code"] == "stage_failed" and error["retryable"] is True and "SpeechStack" in error["message"]
        assert error["request_id"] == response.headers["x-request-id"]
        raw = await client.post(turns, headers={**ACME, "Accept": "audio/pcm;rate=24000"}, content=body)
        assert raw.status_code == 200 and 0 < len(raw.content) and len(raw.content) % (FRAME * 2) == 0  # ends cleanly
        assert (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["version"] == 0
        assert admission.held() == 0 and backend.speech.turns == {}  # no ticket, no slot left behind
        failing.failing = False
        for _ in range(100):  # the stage counts as down until a reading that started after the failure
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        done = parse_sse((await client.post(turns, headers=ACME, content=body)).text)[-1]
        assert done[0] == "done" and done[1]["session_version"] == 1
        assert 'chroma_turns_total{outcome="failed"} 2.0' in (await client.get("/metrics")).text


async def test_over_the_tenants_quota_is_429_with_retry_after(store, backend):
    tenants = TenantDirectory(KEYS, {"acme": TenantQuota(max_turns=0)})
    async with client_for(build_api(store, tenants, backend)) as client:
        voice = await make_voice(client)
        session = await make_session(client, voice["id"])
        response = await client.post(f"/v1/sessions/{session['id']}/turns", headers=ACME,
                                     content=encode_wav(caller_wave(), 16000))
        error = assert_error(response, 429, "tenant_concurrency_limit")
        assert response.headers["retry-after"] == "1" and error["retryable"] and "acme" in error["message"]
        voice = await make_voice(client, GLOBEX)  # another tenant, the default quota: no bound of its own
        session = await make_session(client, voice["id"], GLOBEX)
        response = await client.post(f"/v1/sessions/{session['id']}/turns", headers=GLOBEX,
                                     content=encode_wav(caller_wave(), 16000))
        assert parse_sse(response.text)[-1][0] == "done"


class SilentBackend(StubBackend):
    async def run_turn(self, turn_id, voice, session, plan):
        await asyncio.Event().wait()  # a stage that never answers
        yield  # pragma: no cover


async def test_a_reply_that_never_starts_is_refused_not_left_waiting(store):
    app = build_api(store, TenantDirectory(KEYS), SilentBackend(), admission=AdmissionSettings(start_timeout_s=0.5))
    async with client_for(app) as client:
        voice = await make_voice(client)
        session = await make_session(client, voice["id"])
        response = await client.post(f"/v1/sessions/{session['id']}/turns", headers=ACME,
                                     content=encode_wav(caller_wave(), 16000))
        assert "did not start" in assert_error(response, 503, "stage_unavailable")["message"]
        assert app.state.services.admission.held() == 0


# ---- a session longer than the Reasoner's context ---------------------------------------------------------------
async def turn_done(client, session_id: str, audio: np.ndarray) -> dict:
    response = await client.post(f"/v1/sessions/{session_id}/turns", headers={**ACME, "Accept": "text/event-stream"},
                                 content=encode_wav(audio, 16000), timeout=300)
    assert response.status_code == 200, response.text
    kind, done = parse_sse(response.text)[-1]
    assert kind == "done", done
    return done


async def offline_reply_to_last_turn(store, chroma, session_id: str):
    """The offline reference's reply to the session's last turn, given the history that turn read (what it
    committed, less the turn itself) and the caller audio as the server heard it."""
    from cluster.pipeline.turn import build_conversation
    from model.processing.audio import decode_audio, pcm16_wave
    from model.processing.processor import Message

    state = await store.get_session("acme", session_id)
    audio = await store.load_history_audio(state)
    read = state.model_copy(update={"history": state.history[:-2]})
    user = Message("user", audio=pcm16_wave(audio[-2]), sample_rate=16000)
    voice = chroma.voice("Hello there, this is me.", decode_audio(voice_wav())[0], 24000)
    return chroma.reply(build_conversation(read, audio[:-2], user), voice, max_frames=MAX_FRAMES)


async def test_a_long_session_drops_its_oldest_history_and_every_turn_is_the_offline_reply(client, store, chroma):
    """A token limit far below the context makes a few short turns a long session. Every turn answers; what it
    dropped is the oldest, shows in the session, and leaves Redis; each reply equals the offline reference's reply
    to the history the turn read."""
    voice = await make_voice(client)
    truncation = {"type": "retention_ratio", "retention_ratio": 0.6, "token_limits": {"post_instructions": 120}}
    session = await make_session(client, voice["id"], system_prompt="Be brief.", truncation=truncation)
    assert session["truncation"] == truncation and session["dropped"] == {"messages": 0, "caller_audio": 0,
                                                                           "deleted": 0, "item_ids": []}
    dropped, audio_key = [], store._session_keys("acme", session["id"])[1]
    for n in range(6):
        before = (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["history"]
        done = await turn_done(client, session["id"], caller_wave(seed=20 + n, seconds=0.8))
        state = (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()
        read = [m["id"] for m in state["history"][:-2]]
        assert read == [m["id"] for m in before if m["id"] not in done["dropped"]]
        for role in ("user", "assistant"):  # the oldest went: caller audio first, then reply text
            ids = [m["id"] for m in before if m["role"] == role]
            assert ids[: len(set(ids) & set(done["dropped"]))] == [i for i in done["dropped"] if i in ids]
        assert done["prompt_tokens"] > 0 and done["cached_tokens"] == 0  # transformers: no prefix cache
        spoken = {m["id"] for m in state["history"] if m["audio_bytes"]}
        assert {k.decode() for k in await store.redis.hkeys(audio_key)} == spoken  # Redis holds what is read
        expected = await offline_reply_to_last_turn(store, chroma, session["id"])
        assert (done["text"], done["frames"]) == (expected.text, expected.frames.shape[0]), n
        dropped += done["dropped"]
    assert dropped and state["dropped"]["messages"] == len(dropped) == len(state["dropped"]["item_ids"])
    assert state["version"] == 6 and len(state["history"]) < 12
    metrics = (await client.get("/metrics")).text
    assert f'chroma_history_dropped_total{{what="messages"}} {float(len(dropped))}' in metrics
    assert "chroma_reasoner_prompt_tokens_total" in metrics and "chroma_reasoner_cached_tokens_total" in metrics


async def test_with_truncation_disabled_a_full_context_is_refused_until_items_are_deleted(client):
    """Two turns of 58 s fill most of the tiny thinker's 4096 positions: the third is refused, naming the limit;
    once the client deletes the oldest caller message it is answered."""
    voice = await make_voice(client)
    session = await make_session(client, voice["id"], truncation="disabled")
    turns = f"/v1/sessions/{session['id']}/turns"
    for n in range(2):
        await turn_done(client, session["id"], caller_wave(seed=40 + n, seconds=58.0))
    body = encode_wav(caller_wave(seed=42, seconds=58.0), 16000)
    error = assert_error(await client.post(turns, headers=ACME, content=body, timeout=300), 409, "context_full")
    assert "context of 4096" in error["message"] and "disabled" in error["message"]
    history = (await client.get(f"/v1/sessions/{session['id']}", headers=ACME)).json()["history"]
    assert len(history) == 4
    deleted = await client.delete(f"/v1/sessions/{session['id']}/history/{history[0]['id']}", headers=ACME)
    assert deleted.status_code == 200 and [m["id"] for m in deleted.json()["history"]] == [m["id"] for m in history[1:]]
    assert deleted.json()["dropped"]["deleted"] == 1
    assert_error(await client.delete(f"/v1/sessions/{session['id']}/history/{history[0]['id']}", headers=ACME), 404)
    done = await turn_done(client, session["id"], caller_wave(seed=42, seconds=58.0))
    assert done["session_version"] == 3 and done["dropped"] == []


async def test_only_an_utterance_that_cannot_fit_by_itself_is_refused_and_truncation_can_change(client):
    voice = await make_voice(client)
    long_prompt = " ".join(f"rule {n}: answer politely and briefly." for n in range(400))  # > 4096 positions
    session = await make_session(client, voice["id"], system_prompt=long_prompt)
    turns = f"/v1/sessions/{session['id']}/turns"
    error = assert_error(await client.post(turns, headers=ACME, content=encode_wav(caller_wave(), 16000)), 422,
                         "utterance_too_long")
    assert "context of 4096" in error["message"]
    patched = await client.patch(f"/v1/sessions/{session['id']}", headers=ACME,
                                 json={"system_prompt": "Be brief.", "truncation": "disabled"})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["system_prompt"], patched.json()["truncation"]) == ("Be brief.", "disabled")
    assert (await turn_done(client, session["id"], caller_wave()))["session_version"] == 1
    assert_error(await client.patch(f"/v1/sessions/{session['id']}", headers=ACME,
                                    json={"truncation": {"type": "retention_ratio", "retention_ratio": 2}}), 422)
    assert_error(await client.post("/v1/sessions", headers=ACME, json={"voice_id": voice["id"], "truncation": "no"}), 422)
