"""The Serve deployment chain Reasoner -> SpeechStack -> Codec on a real local Ray cluster (tiny RANDOM-WEIGHT
checkpoint, transformers Reasoner): a streamed reply equals the offline one, and a caller who leaves frees
every slot."""

import asyncio

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.codec import CodecDeployment  # noqa: E402
from deployments.reasoner import ReasonerDeployment  # noqa: E402
from deployments.speech import SpeechStackDeployment  # noqa: E402
from model.audio import synthetic_speech  # noqa: E402
from model.checkpoint import split_thinker  # noqa: E402
from model.processor import Conversation, Turn  # noqa: E402

SMALL = {"ray_actor_options": {"num_cpus": 0.25}}  # three replicas must fit on a 2-core machine


@pytest.fixture(scope="module")
def chain(tiny_checkpoint, tmp_path_factory):
    thinker_dir = split_thinker(tiny_checkpoint, tmp_path_factory.mktemp("thinker") / "thinker")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    reasoner = ReasonerDeployment.options(**SMALL).bind(str(thinker_dir), engine="hf")
    speech = SpeechStackDeployment.options(name="SpeechStack", **SMALL).bind(str(tiny_checkpoint), reasoner, {"max_slots": 4})
    handles = {
        "codec": serve.run(CodecDeployment.options(**SMALL).bind(str(tiny_checkpoint), speech, 8), name="chain"),
    }
    handles["speech"] = serve.get_deployment_handle("SpeechStack", app_name="chain")
    yield handles
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
        if stats["live_slots"] == 0:
            break
        await asyncio.sleep(0.1)
    assert stats["live_slots"] == 0 and stats["free_slots"] == 4
