"""Real-time capacity from measured step times (model.engines.realtime): what admission control reads as each
stage's capacity. The engines run the tiny RANDOM-WEIGHT model; only their step timing is looked at."""

import asyncio

import pytest
import torch

from model.chroma.checkpoint import Checkpoint, load_codec
from model.engines.codec import CodecEngine
from model.engines.realtime import StepTimes
from model.engines.speech import SpeechEngine, SpeechEngineSettings
from tests.test_speech_engine import collect, conversation, reasoner_stream

BUDGET_S = 0.064  # 0.8 of an 80 ms frame


def test_nothing_measured_means_one_turn_which_measures_it():
    assert StepTimes().largest_batch(BUDGET_S, 8) == 1


def test_beyond_the_largest_measured_batch_cost_grows_in_proportion():
    times = StepTimes()
    times.record(1, 0.020)
    assert times.largest_batch(BUDGET_S, 8) == 3  # 20, 40, 60 ms fit; 80 does not
    assert times.largest_batch(BUDGET_S, 2) == 2  # never more than the slots


def test_a_larger_batch_seen_to_keep_up_raises_capacity():
    times = StepTimes()
    times.record(1, 0.020)
    times.record(4, 0.024)  # batching is nearly free here (a GPU)
    assert times.largest_batch(BUDGET_S, 16) == 10  # 24 ms * 10 / 4 = 60 ms; 11 would be 66
    assert times.largest_batch(BUDGET_S, 8) == 8


def test_steps_slowing_down_under_contention_lower_capacity():
    times = StepTimes(weight=0.5)
    times.record(1, 0.010)
    times.record(2, 0.020)
    assert times.largest_batch(BUDGET_S, 8) == 6
    for _ in range(6):
        times.record(2, 0.050)  # the other stages now share the cores
    assert times.largest_batch(BUDGET_S, 8) == 2
    assert times.snapshot_ms() == {1: 10.0, 2: pytest.approx(49.53, abs=0.01)}


def test_a_replica_too_slow_for_one_turn_still_takes_one():
    times = StepTimes()
    times.record(1, 0.200)
    assert times.largest_batch(BUDGET_S, 8) == 1


def test_up_to_the_largest_measured_batch_a_smaller_one_costs_at_most_a_larger_one():
    times = StepTimes()
    times.record(1, 0.070)  # one slow outlier (a cold cache)
    times.record(3, 0.030)
    assert times.largest_batch(BUDGET_S, 8) == 6  # 1..3 bounded by the 3-batch's 30 ms; 6 -> 60 ms


async def test_the_speech_engine_reports_its_measured_real_time_slots(chroma):
    voice = chroma.voice("This is the first voice.", torch.zeros(24000).numpy(), 24000)
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4))
    assert engine.realtime_slots() == 1  # nothing measured yet
    frames = [await engine.submit(f"t{i}", voice, reasoner_stream(chroma.thinker, conversation(chroma, i, 0.6)),
                                  max_frames=8) for i in range(2)]
    await asyncio.gather(*(collect(f) for f in frames))
    stats = engine.stats()
    assert set(stats["step_ms_by_batch"]) <= {1, 2} and stats["step_ms_by_batch"]
    measured = StepTimes(weight=1.0)
    for batch, ms in stats["step_ms_by_batch"].items():
        measured.record(batch, ms / 1000)
    assert engine.realtime_slots() == measured.largest_batch(BUDGET_S, 4) == stats["realtime_slots"]
    await engine.close()

    tight = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4, max_step_rtf=1e-6))
    unbounded = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4, max_step_rtf=None))
    frames = await tight.submit("t", voice, reasoner_stream(chroma.thinker, conversation(chroma, 1, 0.6)), max_frames=4)
    await collect(frames)
    assert tight.realtime_slots() == 1  # no step fits a microsecond: one turn, never none
    assert unbounded.realtime_slots() == 4  # the slots alone
    await tight.close()
    await unbounded.close()


def test_the_codec_engine_reports_its_measured_real_time_streams(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint)
    codec, config = load_codec(checkpoint), checkpoint.config
    engine = CodecEngine(codec, config, max_streams=3, chunk_frames=2, max_step_rtf=0.8)
    assert engine.realtime_streams() == 1
    codes = torch.randint(0, engine.codebook_size, (2, engine.num_codebooks))
    for turn in ("a", "b"):
        engine.open_stream(turn)
        engine.push(turn, codes)
    assert set(engine.step()) == {"a", "b"}
    (batch, ms), = engine.stats()["decode_ms_by_batch"].items()
    assert batch == 2 and ms > 0
    budget_ms = 0.8 * 2 * 80
    expected = max(1, min(3, int(budget_ms * 2 // ms))) if ms <= budget_ms else 1
    assert engine.realtime_streams() == expected
    assert CodecEngine(codec, config, max_streams=3).realtime_streams() == 3  # no bound: its streams
