"""SpeechEngine: continuous batching gives every turn exactly its offline frames (tiny RANDOM-WEIGHT model)."""

import asyncio
import copy
import threading

import pytest
import torch

from model.chroma.speech import DecodeInputs
from model.chroma.turn import VoicePrompt
from model.offline import generate_turn, speak_turn
from model.testing.random_speech import random_speech, speech_config
from model.reasoner.hf import ReasonerSession
from model.processing.processor import Conversation, Message
from model.chroma.sampling import SamplingParams
from model.engines.realtime import CALIBRATION_RUNS
from model.engines.speech import CapacityError, SpeechEngine
from model.settings import SpeechEngineSettings
from tests.conftest import cuda_layout_sdpa, speech_like


@pytest.fixture(scope="module")
def voices(chroma):
    return [
        chroma.voice("This is the first voice.", speech_like(24000, 1.2, seed=10), 24000),
        chroma.voice("A second, rather different speaker reads this longer sentence.", speech_like(24000, 2.3, seed=11), 24000),
        chroma.voice("Third.", speech_like(16000, 0.7, seed=12), 16000),
    ]


def conversation(chroma, seed, seconds):
    conv = Conversation("You are a helpful voice assistant.", [Message("user", audio=speech_like(16000, seconds, seed=seed), sample_rate=16000)])
    return chroma.processor.encode_conversation(conv)


async def reasoner_stream(thinker, inputs, delay=0.0, max_tokens=200, im_end=None):
    """The thinker as an async source of (token, hidden) pairs, like the Reasoner deployment will be."""
    session = ReasonerSession(thinker)
    token, hidden = session.prefill(inputs)
    for _ in range(max_tokens):
        if delay:
            await asyncio.sleep(delay)
        yield token, hidden
        if token == im_end:
            return
        token, hidden = session.step(token)


async def collect(frames):
    return [f async for f in frames]


def reference(chroma, inputs, voice, max_frames, sampling=None):
    return generate_turn(chroma.thinker, chroma.speech, chroma.codec, inputs, voice, max_frames=max_frames, sampling=sampling)


def codes_of(generated):
    return [f.codes for f in generated if f.codes is not None]


async def cancel_after(engine, turn_id, frames, count):
    """Collect a turn's frames and cancel it once `count` frames came (whatever the engine's speed)."""
    got = []
    async for frame in frames:
        got.append(frame)
        if len(codes_of(got)) == count:
            assert engine.cancel(turn_id)
    return got


async def wait_for_steps(engine, count):
    while engine.steps < count:
        await asyncio.sleep(0.005)


async def test_batched_greedy_frames_equal_offline_frames(chroma, voices):
    im_end = chroma.config.im_end_token_id
    plans = [  # (voice, conversation seed, seconds, max_frames, join after this many engine steps)
        (0, 1, 1.0, 24, 0),
        (1, 2, 1.6, 30, 0),
        (2, 3, 0.6, 18, 3),
        (0, 4, 2.0, 26, 7),
        (1, 5, 0.9, 40, 9),  # cancelled midway
    ]
    inputs = [conversation(chroma, seed, seconds) for _, seed, seconds, _, _ in plans]
    expected = [reference(chroma, inputs[i], voices[v], n).frames.tolist() for i, (v, _, _, n, _) in enumerate(plans)]

    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=8))
    tasks = []
    for i, (v, _, _, max_frames, join_at) in enumerate(plans):
        await wait_for_steps(engine, join_at)
        stream = reasoner_stream(chroma.thinker, inputs[i], delay=0.002 * i, im_end=im_end)
        frames = await engine.submit(f"turn-{i}", voices[v], stream, max_frames=max_frames)
        tasks.append(asyncio.create_task(collect(frames) if i < 4 else cancel_after(engine, f"turn-{i}", frames, 5)))
    results = await asyncio.gather(*tasks)

    for i in range(4):
        assert codes_of(results[i]) == expected[i], f"turn {i}"
    cancelled = codes_of(results[4])
    assert 0 < len(cancelled) < len(expected[4])
    assert cancelled == expected[4][: len(cancelled)]

    stats = engine.stats()
    assert stats.live_slots == 0 and stats.queued == 0 and stats.free_slots == 8
    assert stats.slot_cache_bytes_in_use == 0
    assert stats.voice_cache_entries == 3  # one prefix per voice, shared by the turns in that voice
    engine.clear_voice_cache()
    assert engine.stats().voice_cache_bytes == 0
    await engine.close()


async def test_text_tokens_travel_with_the_frames(chroma, voices):
    inputs = conversation(chroma, 1, 1.0)
    expected = reference(chroma, inputs, voices[0], 20)
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=2))
    frames = await collect(await engine.submit("t", voices[0], reasoner_stream(chroma.thinker, inputs, im_end=chroma.config.im_end_token_id), max_frames=20))
    assert [t for f in frames for t in f.text_tokens] == expected.text_tokens
    await engine.close()


async def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(chroma, voices):
    sampling = SamplingParams(temperature=0.8, top_k=30, seed=1234)
    inputs = conversation(chroma, 6, 1.0)
    alone = reference(chroma, inputs, voices[0], 16, sampling).frames.tolist()

    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4))
    others = [
        await engine.submit(f"other-{i}", voices[i + 1], reasoner_stream(chroma.thinker, conversation(chroma, 7 + i, 1.2)),
                            sampling=SamplingParams(temperature=1.0, seed=i), max_frames=20)
        for i in range(2)
    ]
    ours = await engine.submit("ours", voices[0], reasoner_stream(chroma.thinker, inputs), sampling=sampling, max_frames=16)
    results = await asyncio.gather(collect(ours), *(collect(o) for o in others))
    assert codes_of(results[0]) == alone
    await engine.close()


async def test_a_slow_thinker_does_not_stall_other_turns(chroma, voices):
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4))
    slow = await engine.submit("slow", voices[0], reasoner_stream(chroma.thinker, conversation(chroma, 1, 1.0), delay=1.0), max_frames=30)
    fast = await engine.submit("fast", voices[1], reasoner_stream(chroma.thinker, conversation(chroma, 2, 1.0)), max_frames=12)
    slow_task = asyncio.create_task(collect(slow))
    fast_frames = await collect(fast)
    assert len(codes_of(fast_frames)) == 12
    assert not slow_task.done()  # still waiting for its thinker while the fast turn finished
    assert engine.cancel("slow")
    await slow_task
    assert engine.stats().live_slots == 0
    await engine.close()


async def test_full_engine_refuses_clearly_and_queued_turns_get_slots(chroma, voices):
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=1, max_queue=1))
    first = await engine.submit("a", voices[0], reasoner_stream(chroma.thinker, conversation(chroma, 1, 1.0)), max_frames=6)
    queued = await engine.submit("b", voices[0], reasoner_stream(chroma.thinker, conversation(chroma, 2, 1.0)), max_frames=6)
    assert engine.stats().queued == 1
    with pytest.raises(CapacityError, match="no free slots"):
        await engine.submit("c", voices[0], reasoner_stream(chroma.thinker, conversation(chroma, 3, 1.0)), max_frames=6)
    with pytest.raises(ValueError, match="already running"):
        await engine.submit("a", voices[0], reasoner_stream(chroma.thinker, conversation(chroma, 3, 1.0)))
    a, b = await asyncio.gather(collect(first), collect(queued))
    assert len(codes_of(a)) == 6 and len(codes_of(b)) == 6
    assert engine.stats().free_slots == 1
    await engine.close()


async def test_closing_the_frame_iterator_cancels_the_turn(chroma, voices):
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=2))
    frames = await engine.submit("x", voices[0], reasoner_stream(chroma.thinker, conversation(chroma, 1, 1.0)), max_frames=50)
    async for _ in frames:
        break
    await frames.aclose()
    assert engine.stats().live_slots == 0 and "x" not in engine.turns
    await engine.close()


async def test_a_failing_thinker_fails_only_its_turn(chroma, voices):
    async def broken():
        raise RuntimeError("reasoner went away")
        yield  # pragma: no cover

    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=2))
    bad = await engine.submit("bad", voices[0], broken())
    good = await engine.submit("good", voices[1], reasoner_stream(chroma.thinker, conversation(chroma, 2, 1.0)), max_frames=5)
    with pytest.raises(RuntimeError, match="reasoner went away"):
        await collect(bad)
    assert len(codes_of(await collect(good))) == 5
    await engine.close()


def one_layer_copy(speech):
    """The speech model with one layer per stack: torch.compile traces every op of a step, so the compile tests
    trace half as many with it (tiny RANDOM weights either way)."""
    speech = copy.deepcopy(speech)
    for stack in (speech.backbone.model, speech.decoder.model):
        stack.layers = stack.layers[:1]
        stack.config = stack.config.model_copy(update={"num_hidden_layers": 1})
    return speech


async def test_compiled_step_has_no_graph_break_and_gives_the_same_frames(chroma, voices):
    """What a CUDA graph captures (the padded decode step per bucket) compiles with fullgraph=True: no graph break,
    so no host sync and no data-dependent Python. Its frames equal generate_turn's and the eager engine's."""
    speech = one_layer_copy(chroma.speech)
    plans = [(2, 1, 1.0, 12), (2, 3, 0.6, 6)]  # (voice, conversation seed, seconds, frames): short, one kv bucket
    inputs = [conversation(chroma, seed, seconds) for _, seed, seconds, _ in plans]
    expected = [
        generate_turn(chroma.thinker, speech, chroma.codec, inputs[i], voices[v], max_frames=n).frames.tolist()
        for i, (v, _, _, n) in enumerate(plans)
    ]
    im_end = chroma.config.im_end_token_id

    async def run(settings):
        engine = SpeechEngine(speech, settings)
        streams = [
            await engine.submit(f"t{i}", voices[v], reasoner_stream(chroma.thinker, inputs[i], im_end=im_end), max_frames=n)
            for i, (v, _, _, n) in enumerate(plans)
        ]
        results = await asyncio.gather(*(collect(s) for s in streams))
        await engine.close()
        return [codes_of(r) for r in results], engine.decode_steps.bucket_steps

    eager, _ = await run(SpeechEngineSettings(max_slots=2, step_mode="eager"))
    compiled, buckets = await run(SpeechEngineSettings(max_slots=2, step_mode="compiled", compile_backend="eager"))
    assert eager == expected
    assert compiled == expected
    # Both batch buckets (both turns, then the longer one alone) and both widths (frame alone, frame + pair) ran.
    assert {batch for batch, _, _ in buckets} == {1, 2}
    assert {width for _, width, _ in buckets} == {1, 3}


class BlockingStack(torch.nn.Module):
    """The backbone stack, except that a voice-prompt prefill (a forward over more than one frame plus a Reasoner
    pair) waits for `release`: the engine thread is then inside that forward for as long as the test wants."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.entered, self.release = threading.Event(), threading.Event()

    def allocate_cache(self, rows, capacity=None):
        return self.stack.allocate_cache(rows, capacity)

    def forward(self, x, cache, step):
        if x.shape[1] > 3:
            self.entered.set()
            self.release.wait()
        return self.stack(x, cache, step)


async def test_submit_and_cancel_return_while_a_voice_prompt_is_prefilled(chroma, voices):
    inputs = conversation(chroma, 2, 1.0)
    expected = reference(chroma, inputs, voices[1], 6).frames.tolist()
    speech = chroma.speech
    blocking = BlockingStack(speech.backbone.model)
    speech.backbone.model = blocking
    watchdog = threading.Timer(60, blocking.release.set)  # a regression fails the test instead of hanging it
    try:
        engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=2))
        first = await engine.submit("first", voices[0], reasoner_stream(chroma.thinker, conversation(chroma, 1, 1.0)), max_frames=6)
        assert await asyncio.to_thread(blocking.entered.wait, 300)
        watchdog.start()
        # On the event loop, as the deployments call them, while the engine thread is inside the prefill forward:
        second = await engine.submit("second", voices[1], reasoner_stream(chroma.thinker, inputs), max_frames=6)
        cancelled = engine.cancel("first")
        assert not blocking.release.is_set(), "submit() or cancel() waited for the voice-prompt prefill"
        assert cancelled
        blocking.release.set()
        assert codes_of(await collect(first)) == []
        assert codes_of(await collect(second)) == expected
        assert engine.stats().free_slots == 2
        await engine.close()
    finally:
        blocking.release.set()
        watchdog.cancel()
        speech.backbone.model = blocking.stack


def gqa_speech():
    """RANDOM weights with Chroma-4B's kind of grouped-query attention (2 kv heads; the tiny checkpoint has 1, where
    the fold of the query heads is a plain view whatever the strides), one layer per stack."""
    layers = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    return random_speech(speech_config(
        {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "max_position_embeddings": 256, **layers},
        {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, **layers},
    ))


def synthetic_turn(speech, seed, pairs=8):
    """(voice, Reasoner pairs) of random ids and hidden states."""
    generator = torch.Generator().manual_seed(seed)
    voice = VoicePrompt(torch.randint(0, 4000, (5 + seed,), generator=generator),
                        torch.randint(1, 2048, (8 + 2 * seed, 8), generator=generator), 8 + 2 * seed)
    hidden = speech.config.backbone_config.hidden_size
    items = [(int(torch.randint(0, 4000, (1,), generator=generator)), torch.randn(hidden, generator=generator)) for _ in range(pairs)]
    return voice, items


def offline_frames(speech, turns, frames):
    """Each (voice, pairs) turn's frames from the offline loop."""
    expected = []
    for voice, items in turns:
        pairs = iter(items)
        expected.append(speak_turn(speech, voice, lambda _: next(pairs), frames).frames)
    return expected


async def as_stream(items):
    for item in items:
        yield item


@pytest.mark.parametrize("mode", ["eager", "padded", "compiled"])
async def test_batched_steps_take_sdpa_outputs_in_the_cuda_layout(mode):
    """Every step mode at batch > 1 with SDPA returning non-contiguous outputs, as on CUDA: the frames are the offline
    loop's (computed with the CPU's contiguous outputs)."""
    speech = gqa_speech()
    turns = [synthetic_turn(speech, seed) for seed in range(3)]
    expected = offline_frames(speech, turns, 10)
    with cuda_layout_sdpa():
        engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=4, step_mode=mode, compile_backend="eager"))
        streams = [await engine.submit(f"t{i}", voice, as_stream(items), max_frames=10) for i, (voice, items) in enumerate(turns)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        await engine.close()
    assert [codes_of(r) for r in results] == expected


class ReplayingGraph:
    """A CUDA graph's contract on a CPU: capture runs the step once; replay reruns it on the same tensors and writes
    the captured outputs."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args
        self.outputs = fn(*args)

    def replay(self):
        outputs = self.fn(*self.args)
        if outputs is not None:
            self.outputs.copy_(outputs)

    def pool(self):
        return None


async def test_buckets_that_cannot_be_captured_run_padded_eager(monkeypatch, caplog):
    """A capture that fails (here every bucket of batch 2, as a capture fails on a GPU) leaves its bucket to padded
    eager: logged once when the engine is built, counted in stats, and the frames are still the offline loop's."""
    import model.engines.graphs as graphs
    import model.engines.speech as speech_engine

    def capture(fn, args, stream, pool):
        if isinstance(args[2], DecodeInputs) and args[2].start.shape[0] == 2:  # the decode step's, not the prefill's
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        graph = ReplayingGraph(fn, args)
        return graph, graph.outputs

    monkeypatch.setattr(graphs, "capture_graph", capture)
    monkeypatch.setattr(speech_engine, "resolve_step_mode", lambda mode, device: mode)  # graph modes on a CPU
    speech = gqa_speech()
    turns = [synthetic_turn(speech, seed) for seed in range(2)]
    expected = offline_frames(speech, turns, 10)

    with caplog.at_level("WARNING", logger="model.engines.graphs"):
        engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=2, step_mode="cuda_graphs"))
    buckets = engine.decode_steps.step.buckets
    failing = [key for key in buckets if key[0] == 2]
    assert failing and len(failing) < len(buckets)
    [record] = caplog.records
    assert "operation not permitted when stream is capturing" in record.getMessage()
    assert f"{len(failing)} of {len(buckets)} buckets run padded eager" in record.getMessage()

    streams = [await engine.submit(f"t{i}", voice, as_stream(items), max_frames=10) for i, (voice, items) in enumerate(turns)]
    results = await asyncio.gather(*(collect(s) for s in streams))
    stats = engine.stats()
    await engine.close()
    assert [codes_of(r) for r in results] == expected
    assert stats.cuda_graphs == len(buckets) - len(failing)
    assert stats.eager_fallback_buckets == len(failing)
    assert stats.eager_fallback_steps > 0  # both turns stepped together, in a batch-2 bucket
    calibration = (1 + CALIBRATION_RUNS) * len(engine.decode_steps.batch_buckets)  # at width 3, the whole cache
    assert sum(engine.decode_steps.bucket_steps.values()) == stats.steps + calibration
    assert len(caplog.records) == 1  # the steps themselves log nothing


@pytest.mark.parametrize("mode", ["eager", "padded"])
def test_voice_prompts_are_prefilled_together_in_one_forward(mode):
    """Three voices of different lengths in one forward give each the keys/values of its prompt prefilled alone."""
    from model.chroma.layers import StepInputs
    from model.chroma.turn import voice_prompt_attend
    from model.engines.voice_prefill import VoicePrefill

    speech = gqa_speech()
    voices = [synthetic_turn(speech, seed)[0] for seed in range(3)]
    prefill = VoicePrefill(speech, mode, max_voices=4)
    together = prefill.run(voices)
    assert prefill.stats().forwards == 1 and prefill.stats().voices == 3
    for voice, prefix in zip(voices, together):
        embeds = speech.voice_prompt_embeddings(voice.transcript_ids, voice.codes)
        alone = speech.allocate_backbone_cache(rows=1, capacity=embeds.shape[0])
        with torch.inference_mode():
            step = StepInputs.contiguous([0], [0], [embeds.shape[0]], "cpu", attend=voice_prompt_attend(voice)[None])
            speech.backbone.model(embeds[None], alone, step)
        assert torch.equal(prefix.keys, alone.keys[0, :, :, :-1]) and torch.equal(prefix.values, alone.values[0, :, :, :-1])
        assert torch.equal(prefix.visible, alone.visible[0, :-1])


async def test_a_cached_voice_skips_its_prefill():
    """Turns in two new voices that start together are prefilled once per voice; a later turn in a cached voice is
    not prefilled again. Every turn's frames are the offline loop's."""
    speech = gqa_speech()
    (voice_a, pairs_a), (voice_b, pairs_b) = synthetic_turn(speech, 0), synthetic_turn(speech, 1)
    plans = [(voice_a, pairs_a), (voice_b, pairs_b), (voice_a, pairs_b)]
    expected = offline_frames(speech, plans + [(voice_b, pairs_a)], 8)
    engine = SpeechEngine(speech, SpeechEngineSettings(max_slots=4))
    streams = [await engine.submit(f"t{i}", voice, as_stream(items), max_frames=8) for i, (voice, items) in enumerate(plans)]
    results = [codes_of(r) for r in await asyncio.gather(*(collect(s) for s in streams))]
    prefilled = engine.stats().voice_prefill
    assert prefilled.voices == 2 and prefilled.forwards <= 2
    results.append(codes_of(await collect(await engine.submit("again", voice_b, as_stream(pairs_a), max_frames=8))))
    assert engine.stats().voice_prefill == prefilled  # voice b came from the cache
    await engine.close()
    assert results == expected
