"""Real-time capacity from measured step times (model.engines.realtime): what admission control reads as each
stage's capacity. The engines run the tiny RANDOM-WEIGHT model; only their step timing is looked at."""

import asyncio

import pytest
import torch

from cluster.admission.stages import StageStatus
from model.chroma.checkpoint import Checkpoint, load_codec
from model.engines.codec import CodecEngine
from model.engines.realtime import Headroom, StepTimes
from model.engines.speech import SpeechEngine
from model.settings import SpeechEngineSettings
from tests.test_speech_engine import codes_of, collect, conversation, reasoner_stream, reference

BUDGET_S = 0.064  # 0.8 of an 80 ms frame


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def curve(times: StepTimes, ms_by_batch: dict[int, float]) -> StepTimes:
    for batch, ms in ms_by_batch.items():
        times.record(batch, ms / 1000)
    return times


def test_nothing_measured_means_one_turn_which_measures_it():
    assert StepTimes().largest_batch(BUDGET_S, 8) == 1


def test_a_sub_linear_curve_is_interpolated_between_its_buckets():
    # A GPU's: batching is nearly free. 16 fits at 50 ms; 32 at 70 ms does not; between them, the line.
    times = curve(StepTimes(), {1: 20, 2: 21, 4: 23, 8: 30, 16: 50, 32: 70})
    assert times.largest_batch(BUDGET_S, 32) == 27  # 50 + (27 - 16) / 16 * 20 = 63.75 ms; 28 would be 65
    assert times.largest_batch(BUDGET_S, 8) == 8  # never more than the slots


def test_a_linear_curve_fits_as_many_as_the_budget_holds():
    times = curve(StepTimes(), {1: 10, 2: 20, 4: 40, 8: 80})
    assert times.largest_batch(BUDGET_S, 8) == 6  # 60 ms; 7 would be 70


def test_beyond_the_largest_measured_batch_nothing_is_assumed():
    times = curve(StepTimes(), {1: 10, 2: 12})  # a straight line from these would allow 20 and more
    assert times.largest_batch(BUDGET_S, 16) == 2


def test_noise_does_not_move_the_estimate():
    times = StepTimes()
    for n in range(8):  # one step in four is slow (a page fault, another process's burst)
        curve(times, {1: 10, 2: 15, 4: 25, 8: 90 if n % 4 == 0 else 40})
    assert times.snapshot_ms() == {1: 10.0, 2: 15.0, 4: 25.0, 8: 40.0}
    assert times.largest_batch(BUDGET_S, 8) == 8


def test_a_smaller_batch_never_costs_more_than_a_larger_one():
    times = curve(StepTimes(), {1: 70, 3: 30, 6: 55})  # a slow first step (a cold cache)
    assert times.snapshot_ms() == {1: 70.0, 3: 70.0, 6: 70.0}
    assert times.largest_batch(BUDGET_S, 8) == 1
    assert curve(StepTimes(), {1: 200}).largest_batch(BUDGET_S, 8) == 1  # too slow for one turn: still one


def test_a_contention_burst_lowers_the_estimate_and_reprobes_raise_it_again():
    clock = Clock()
    times = StepTimes(window=8, max_age_s=10, reprobe_s=5, clock=clock)
    buckets = [1, 2, 4, 8]
    times.calibrate(lambda batch: None, buckets)  # stands for padded steps that took no time
    curve(times, {1: 10, 2: 15, 4: 25, 8: 40})
    assert times.largest_batch(BUDGET_S, 8) == 8
    for _ in range(8):  # the other stages take the cores: the real steps at 4 and 8 slow down
        clock.now += 0.08
        curve(times, {4: 70, 8: 120})
    assert times.largest_batch(BUDGET_S, 8) == 3
    assert times.probe_batch(live=4, budget_s=BUDGET_S, max_batch=8, buckets=buckets) is None  # busy: no probe
    probes, recovered_at = 0, None
    while recovered_at is None and clock.now < 60:
        clock.now += 0.5
        live = 2  # the burst is over; admission holds the replica at 3, 2 live
        batch = times.probe_batch(live, BUDGET_S, 8, buckets)
        if batch is not None:
            probes += 1
            times.record(batch, {4: 0.025, 8: 0.040}[batch])
        times.record(2, 0.015)  # real steps of the live turns
        if times.largest_batch(BUDGET_S, 8) == 8:
            recovered_at = clock.now
    assert recovered_at is not None and recovered_at - 0.64 <= 30  # recovered within 30 s of the burst's end
    assert probes <= recovered_at / 5 + 1  # at most one probe every reprobe_s


def test_stale_points_age_out_where_fresher_ones_describe_the_curve():
    clock = Clock()
    times = StepTimes(max_age_s=10, clock=clock)
    curve(times, {1: 10, 3: 70, 8: 40})  # 3 ran during a burst
    assert times.largest_batch(BUDGET_S, 8) == 2
    clock.now = 11
    curve(times, {8: 40})  # a probe
    assert times.snapshot_ms() == {8: 40.0}  # 1 and 3 aged out below a fresh point: 40 ms up to 8
    assert times.largest_batch(BUDGET_S, 8) == 8
    clock.now = 30  # everything stale: the newest knowledge still counts
    assert times.largest_batch(BUDGET_S, 8) == 8


def test_probes_wait_for_room_and_stop_at_the_slots():
    clock = Clock()
    times = curve(StepTimes(reprobe_s=5, clock=clock), {1: 10, 2: 70})
    assert times.probe_batch(0, BUDGET_S, 4, [1, 2, 4]) is None  # 2 was measured just now
    clock.now = 5
    assert times.probe_batch(0, BUDGET_S, 4, [1, 2, 4]) == 2
    assert times.probe_batch(1, BUDGET_S, 4, [1, 2, 4]) is None  # as many live as the estimate: no room
    full = curve(StepTimes(clock=clock), {1: 10, 4: 20})
    assert full.probe_batch(0, BUDGET_S, 4, [1, 2, 4]) is None  # the estimate is the slots


def test_calibration_measures_every_bucket_before_any_turn(chroma):
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4))
    stats = engine.stats()
    assert set(stats.step_ms_by_batch) == {1, 2, 4} and stats.steps_by_batch == {}
    assert stats.calibration_s > 0 and stats.realtime_slots == engine.realtime.capacity() >= 1
    unbounded = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4, max_step_rtf=None))
    assert unbounded.stats().calibration_s is None  # the slots alone bound it: nothing to measure


async def test_an_idle_replica_reprobes_until_its_estimate_recovers(chroma):
    """A replica that calibrated under contention (added by autoscaling during a burst) and has had no turn since:
    once its headroom is read, its engine thread re-probes the bucket above its estimate until the estimate is back."""
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4))
    times = engine.realtime.steps
    times.max_age_s, times.reprobe_s = 0.5, 0.05
    for _ in range(times.window):
        times.record(4, 1.0)  # a step of 4 took a second while the cores were shared
    assert engine.realtime.capacity() < 4
    assert engine.headroom().turns < 4  # reading it starts the engine thread
    for _ in range(200):
        if engine.realtime.capacity() == 4:
            break
        await asyncio.sleep(0.05)
    assert engine.realtime.capacity() == 4 and engine.steps == 0  # probes only: no turn ran
    await engine.close()


def test_a_stage_sums_the_latest_answer_of_each_replica():
    both = StageStatus.across("SpeechStack", [Headroom(2, replica="a"), Headroom(14, replica="b")], replicas=2)
    assert both.ready and both.capacity == 16
    one_heard = StageStatus.across("SpeechStack", [Headroom(6, replica="a")], replicas=3)
    assert one_heard.capacity == 18  # the unheard replicas count as the mean of those heard
    assert StageStatus.across("Reasoner", [Headroom(None)], replicas=2).capacity is None
    down = StageStatus.across("Codec", [Headroom(4)], replicas=1, problem="failing its health check")
    assert not down.ready and down.capacity == 0


async def test_probes_between_live_steps_change_no_turn(chroma):
    """A re-probe runs padding rows over the live turns' cache rows between their steps: their frames stay the
    offline ones."""
    voice = chroma.voice("This is the first voice.", torch.zeros(24000).numpy(), 24000)
    inputs = [conversation(chroma, seed, 0.6) for seed in (1, 2)]
    expected = [reference(chroma, i, voice, 12).frames.tolist() for i in inputs]
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4))
    probes = []
    engine.realtime.steps.probe_batch = lambda *args: 4  # a probe of every row before every step
    run_padding = engine.decode_steps.run_padding
    engine.decode_steps.run_padding = lambda count: (probes.append(count), run_padding(count))
    im_end = chroma.config.im_end_token_id
    frames = [await engine.submit(f"t{n}", voice, reasoner_stream(chroma.thinker, i, im_end=im_end), max_frames=12)
              for n, i in enumerate(inputs)]
    results = await asyncio.gather(*(collect(f) for f in frames))
    assert [codes_of(r) for r in results] == expected
    assert len(probes) >= engine.steps
    await engine.close()


async def test_the_speech_engine_reports_its_measured_real_time_slots(chroma):
    voice = chroma.voice("This is the first voice.", torch.zeros(24000).numpy(), 24000)
    engine = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4))
    frames = [await engine.submit(f"t{i}", voice, reasoner_stream(chroma.thinker, conversation(chroma, i, 0.6)),
                                  max_frames=8) for i in range(2)]
    await asyncio.gather(*(collect(f) for f in frames))
    stats = engine.stats()
    assert set(stats.steps_by_batch) <= {1, 2} and stats.steps_by_batch
    assert set(stats.step_ms_by_batch) >= {1, 2, 4}  # the calibrated buckets, and the real steps' sizes
    measured = StepTimes()
    for batch, ms in stats.step_ms_by_batch.items():
        measured.record(batch, ms / 1000)
    assert engine.realtime.capacity() == measured.largest_batch(BUDGET_S, 4) == stats.realtime_slots
    await engine.close()

    tight = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4, max_step_rtf=1e-6))
    unbounded = SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=4, max_step_rtf=None))
    frames = await tight.submit("t", voice, reasoner_stream(chroma.thinker, conversation(chroma, 1, 0.6)), max_frames=4)
    await collect(frames)
    assert tight.realtime.capacity() == 1  # no step fits a microsecond: one turn, never none
    assert unbounded.realtime.capacity() == 4  # the slots alone
    await tight.close()
    await unbounded.close()


def test_the_codec_engine_calibrates_and_reports_its_measured_real_time_streams(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint)
    codec, config = load_codec(checkpoint), checkpoint.config
    engine = CodecEngine(codec, config, max_streams=3, chunk_frames=2, max_step_rtf=0.8)
    assert engine.realtime.capacity() == 1  # nothing measured yet
    engine.calibrate()
    assert set(engine.stats().decode_ms_by_batch) == {1, 2, 3} and engine.stats().calibration_s > 0
    codes = torch.randint(0, engine.codebook_size, (2, engine.num_codebooks))
    for turn in ("a", "b"):
        engine.open_stream(turn)
        engine.push(turn, codes)
    assert set(engine.step()) == {"a", "b"}
    measured = StepTimes()
    for batch, ms in engine.stats().decode_ms_by_batch.items():
        measured.record(batch, ms / 1000)
    assert engine.realtime.capacity() == measured.largest_batch(0.8 * 2 * 0.080, 3)
    assert CodecEngine(codec, config, max_streams=3).realtime.capacity() == 3  # no bound: its streams


def test_a_codec_probe_changes_no_reply(tiny_checkpoint):
    """Padding rows decode on the scratch slot: a reply decoded with probes between its chunks is the same audio."""
    checkpoint = Checkpoint(tiny_checkpoint)
    codec, config = load_codec(checkpoint), checkpoint.config
    audio = []
    for probe in (False, True):
        engine = CodecEngine(codec, config, max_streams=4, chunk_frames=2, max_step_rtf=0.8)
        codes = torch.randint(0, engine.codebook_size, (6, engine.num_codebooks), generator=torch.Generator().manual_seed(3))
        engine.open_stream("a")
        engine.push("a", codes)
        chunks = []
        for _ in range(3):
            if probe:
                engine.decode_padding(4)
            chunks.append(engine.step()["a"])
        audio.append(torch.cat(chunks))
    torch.testing.assert_close(audio[0], audio[1], rtol=0, atol=0)
