"""The Serve application Ingress -> Codec -> SpeechStack -> Reasoner on a real local Ray cluster and a real Redis
(tiny RANDOM-WEIGHT checkpoint, transformers Reasoner): a streamed reply equals the offline one, the HTTP API
answers spoken turns with history, and a caller who leaves frees every slot."""

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from model.audio import encode_wav, synthetic_speech  # noqa: E402
from model.checkpoint import split_thinker  # noqa: E402
from model.processor import Conversation, Turn  # noqa: E402

KEYS = {"key-acme": "acme"}
AUTH = {"Authorization": "Bearer key-acme"}


@pytest.fixture(scope="module")
def chain(tiny_checkpoint, tmp_path_factory, redis_port):
    from deployments.app import build_app
    from tests.conftest import free_port

    thinker_dir = split_thinker(tiny_checkpoint, tmp_path_factory.mktemp("thinker") / "thinker")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({
        "checkpoint": str(tiny_checkpoint), "thinker": str(thinker_dir), "reasoner_engine": "hf",
        "speech_engine": {"max_slots": 4}, "codec_max_streams": 8, "max_frames": 12, "max_tokens": 64,
        "redis_url": f"redis://127.0.0.1:{redis_port}/0", "api_keys_path": json.dumps(KEYS),
        "replica_cpus": 0.25,  # four replicas must fit on a 2-core machine
    })
    serve.run(app, name="chain", route_prefix="/")
    yield {
        "codec": serve.get_deployment_handle("Codec", app_name="chain"),
        "speech": serve.get_deployment_handle("SpeechStack", app_name="chain"),
        "url": f"http://127.0.0.1:{port}",
    }
    serve.shutdown()
    ray.shutdown()


def conversation(seed):
    return Conversation("You are a helpful voice assistant.", [Turn("user", audio=synthetic_speech(16000, 1.0, seed), sample_rate=16000)])


async def reply(codec, turn_id, voice, conv, max_frames):
    chunks = [c async for c in codec.options(stream=True).reply.remote(turn_id, voice, conv, None, max_frames, 64)]
    audio = np.concatenate([c.audio for c in chunks if c.audio is not None])
    return chunks, audio


async def test_streamed_reply_equals_the_offline_reply(chain, chroma):
    prompt = chroma.processor.encode_voice_prompt("A voice for the cluster.", synthetic_speech(24000, 1.2, 9), 24000)
    voice = await chain["codec"].encode_voice.remote(prompt.text_ids[0].tolist(), prompt.input_values.reshape(-1).numpy())
    conv = conversation(3)
    expected = chroma.reply(conv, voice, max_frames=14)

    chunks, audio = await reply(chain["codec"], "t-1", voice, conv, 14)
    assert sum(c.audio is not None for c in chunks) >= 2  # streamed, not one block at the end
    assert sum(c.frames for c in chunks) == expected.frames.shape[0]
    assert [t for c in chunks for t in c.text_tokens] == expected.text_tokens
    peak = max(1.0, float(np.abs(expected.audio.numpy()).max()))
    np.testing.assert_allclose(audio, expected.audio.numpy(), atol=1e-4 * peak)


async def test_concurrent_replies_each_equal_their_own(chain, chroma):
    prompt = chroma.processor.encode_voice_prompt("Another voice.", synthetic_speech(24000, 0.8, 5), 24000)
    voice = await chain["codec"].encode_voice.remote(prompt.text_ids[0].tolist(), prompt.input_values.reshape(-1).numpy())
    convs = [conversation(10 + i) for i in range(4)]
    results = await asyncio.gather(*(reply(chain["codec"], f"c-{i}", voice, convs[i], 8 + i) for i in range(4)))
    for i, (_, audio) in enumerate(results):
        expected = chroma.reply(convs[i], voice, max_frames=8 + i).audio.numpy()
        np.testing.assert_allclose(audio, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


async def test_a_caller_who_leaves_frees_every_slot(chain, chroma):
    prompt = chroma.processor.encode_voice_prompt("Leaving early.", synthetic_speech(24000, 0.8, 6), 24000)
    voice = await chain["codec"].encode_voice.remote(prompt.text_ids[0].tolist(), prompt.input_values.reshape(-1).numpy())
    stream = chain["codec"].options(stream=True).reply.remote("gone", voice, conversation(20), None, 200, 64)
    async for chunk in stream:
        if chunk.audio is not None:
            break
    stream.cancel()
    for _ in range(100):  # cancellation travels down the chain asynchronously
        stats = await chain["speech"].stats.remote()
        if stats["live_slots"] == 0 and stats["free_slots"] == 4:  # a slot frees once its last step ends
            break
        await asyncio.sleep(0.1)
    assert stats["live_slots"] == 0 and stats["free_slots"] == 4


def sse_events(body: str):
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        yield lines.get("event"), json.loads(lines.get("data", "null"))


async def test_http_turns_through_the_cluster(chain):
    async with httpx.AsyncClient(base_url=chain["url"], timeout=120) as client:
        wav = encode_wav(synthetic_speech(24000, 1.5, seed=2), 24000)
        created = await client.post("/v1/voices", headers=AUTH, files={"audio": ("v.wav", wav, "audio/wav")},
                                    data={"transcript": "A voice over HTTP.", "name": "agent"})
        assert created.status_code == 201, created.text
        session = await client.post("/v1/sessions", headers=AUTH, json={"voice_id": created.json()["id"], "system_prompt": "Be brief."})
        assert session.status_code == 201, session.text
        session_id = session.json()["id"]
        caller = encode_wav(synthetic_speech(16000, 1.0, seed=3), 16000)
        for turn in range(2):
            reply = await client.post(f"/v1/sessions/{session_id}/turns", headers={**AUTH, "Content-Type": "audio/wav", "Accept": "text/event-stream"}, content=caller)
            assert reply.status_code == 200, reply.text
            events = list(sse_events(reply.text))
            audio = [base64.b64decode(data["data"]) for event, data in events if event == "audio"]
            done = [data for event, data in events if event == "done"]
            assert len(audio) >= 2 and len(done) == 1, events[-1]
            assert sum(len(a) for a in audio) == done[0]["frames"] * 1920 * 2  # PCM16 at 24 kHz
        history = (await client.get(f"/v1/sessions/{session_id}", headers=AUTH)).json()["history"]
        assert [h["role"] for h in history] == ["user", "assistant", "user", "assistant"]
        assert (await client.get("/v1/sessions/sess_" + "0" * 32, headers=AUTH)).status_code == 404
        assert (await client.get("/v1/voices")).status_code == 401
