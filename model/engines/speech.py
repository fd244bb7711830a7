"""SpeechEngine: many turns on one device, continuous batching of Backbone + Decoder.

Each live turn owns one slot: a row of a preallocated (static, gpt-fast style) backbone KV cache. Every step
runs ONE batched backbone forward over all turns that are ready, whatever each needs (its first Reasoner pair
after the cached voice prompt, one frame, or a frame plus a Reasoner pair), then ONE batched decoder pass that
completes their frames (`model.engines.decode_steps`: eagerly, or one CUDA graph per batch bucket). A turn joins
at the next step and leaves (finished, failed or cancelled) freeing its slot at once; live turns are kept in the
lowest slots, so a step reads cache rows [0, B) as a view. Reasoner pairs arrive asynchronously per turn; a turn
whose next step needs a pair that has not arrived sits the step out without holding back the others.

The math is `SpeechModel`'s, the same as the offline `generate_turn`, so greedy frames are identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from model.chroma.checkpoint import Checkpoint, load_speech, resolve_dtype
from model.chroma.layers import KVCache
from model.chroma.sampling import SamplingParams
from model.chroma.speech import SpeechModel
from model.chroma.turn import (
    FRAME_SECONDS,
    GeneratedFrame,
    ReasonerPair,
    TurnProgress,
    VoicePrompt,
    turn_frame_budget,
)
from model.engines.cpu_threads import use_intra_op_threads
from model.engines.decode_steps import DecodeSteps, RowInput
from model.engines.graphs import StepStats, resolve_step_mode
from model.engines.realtime import Headroom, RealtimeBound, StepTimes
from model.engines.voice_prefill import VoicePrefill, VoicePrefillStats, VoicePrefix
from model.errors import CapacityError
from model.settings import SpeechEngineSettings, StepMode


@dataclass(frozen=True)
class SpeechStats(StepStats):
    """A SpeechEngine's state and step times; the decode step's buckets are the StepStats fields."""

    live_slots: int
    free_slots: int
    queued: int  # turns waiting for a slot
    steps: int
    frames: int
    steps_per_s: float  # over the last 200 steps
    step_ms_p50: float
    step_ms_p95: float
    slot_cache_bytes_in_use: int
    voice_cache_entries: int
    voice_cache_bytes: int
    step_mode: StepMode
    voice_prefill: VoicePrefillStats
    step_ms_by_batch: dict[int, float]  # the real-time curve (model.engines.realtime)
    steps_by_batch: dict[int, int]  # the turns' own steps (not calibration or probes)
    calibration_s: float | None  # None: no real-time bound, nothing measured
    realtime_slots: int


@dataclass
class _Turn:
    turn_id: str
    voice: VoicePrompt
    voice_key: str
    sampling: SamplingParams
    seed: int
    progress: TurnProgress
    output: asyncio.Queue
    pairs: deque = field(default_factory=deque)
    reasoner_ended: bool = False
    slot: int | None = None
    length: int = 0  # positions in the slot's cache
    unsent_text: list[int] = field(default_factory=list)
    pump: asyncio.Task | None = None
    cancelled: bool = False
    error: BaseException | None = None


@dataclass
class _Row:
    """One turn's part of a step, fixed under the lock when the step is collected."""

    turn: _Turn
    input: RowInput  # on a first step, its start is set once the voice prefix is loaded
    prefix: VoicePrefix | None = None  # first step: the voice prompt's cached keys/values (None: prefill it)

    @property
    def first_step(self) -> bool:
        return self.input.frame == 0


_END = object()


class SpeechEngine:
    """Turn-level API on the asyncio side; the stepping runs in one engine thread (like vLLM's engine core
    busy loop), so a step never waits on the event loop and the event loop never waits on a step. Turn state
    is shared under `self._lock`; results go back to the event loop with call_soon_threadsafe."""

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, settings: SpeechEngineSettings, dtype: str = "float32", device: str = "cpu"
    ) -> SpeechEngine:
        return cls(load_speech(checkpoint, resolve_dtype(dtype), device), settings)

    def __init__(self, speech: SpeechModel, settings: SpeechEngineSettings | None = None):
        self.speech = speech
        self.settings = settings or SpeechEngineSettings()
        self.cache: KVCache = speech.allocate_backbone_cache(rows=self.settings.max_slots)
        self.free_slots = list(range(self.settings.max_slots))  # a heap: a new turn takes the lowest
        self.turns: dict[str, _Turn] = {}
        self.waiting: deque[_Turn] = deque()
        self.voice_cache: OrderedDict[str, VoicePrefix] = OrderedDict()
        self.steps = 0
        self.frames_out = 0
        self.step_times: deque[float] = deque(maxlen=200)
        self.steps_by_batch: Counter[int] = Counter()  # the turns' own steps (not calibration or probes)
        self._lock = threading.Condition()
        self._in_flight: set[str] = set()
        self._slots_to_free: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._position_bytes = (self.cache.keys[0, :, :, 0].nbytes + self.cache.values[0, :, :, 0].nbytes)
        mode = resolve_step_mode(self.settings.step_mode, speech.device)
        self.decode_steps = DecodeSteps(speech, self.cache, mode, self.settings.compile_backend)
        self.voice_prefill = VoicePrefill(
            speech, mode, min(self.settings.prefill_voices, self.settings.max_slots), self.settings.compile_backend
        )
        self.realtime = RealtimeBound(StepTimes(), FRAME_SECONDS, self.settings.max_step_rtf, self.settings.max_slots,
                                      self.decode_steps.batch_buckets)
        self._calibrate()

    def _calibrate(self) -> None:
        """The step's time at every batch bucket, before any turn (model.engines.realtime), on a thread with the
        engine thread's intra-op threads so it measures what the engine thread will run."""
        def measure() -> None:
            if self.speech.device.type == "cpu" and self.settings.cpu_threads is not None:
                use_intra_op_threads(self.settings.cpu_threads)
            self.realtime.calibrate(self.decode_steps.run_padding)

        thread = threading.Thread(target=measure, name="speech-calibration")
        thread.start()
        thread.join()

    # ---- public API (event loop thread) -----------------------------------------------------------------
    async def submit(
        self,
        turn_id: str,
        voice: VoicePrompt,
        reasoner_stream: AsyncIterator[ReasonerPair],
        sampling: SamplingParams | None = None,
        max_frames: int | None = None,
    ) -> AsyncIterator[GeneratedFrame]:
        """Start a turn; returns its frames as they are produced. Closing the iterator cancels the turn."""
        frames = turn_frame_budget(self.speech.config, voice, min(max_frames or self.settings.max_frames, self.settings.max_frames))
        sampling = sampling or SamplingParams()
        turn = _Turn(
            turn_id=turn_id,
            voice=voice,
            voice_key=_voice_key(voice),
            sampling=sampling,
            seed=sampling.turn_seed(),
            progress=TurnProgress(self.speech.config, frames),
            output=asyncio.Queue(),
        )
        self._start()
        with self._lock:
            if turn_id in self.turns:
                raise ValueError(f"turn {turn_id!r} is already running")
            if not self.free_slots and len(self.waiting) >= self.settings.max_queue:
                raise CapacityError(f"no free slots: {self.settings.max_slots} live turns and {len(self.waiting)} queued")
            self.turns[turn_id] = turn
            self._admit_or_queue(turn)
        turn.pump = asyncio.create_task(self._pump(turn, reasoner_stream))
        return self._frames(turn)

    def cancel(self, turn_id: str) -> bool:
        """Stop a turn now and free its slot; returns whether it was live."""
        with self._lock:
            turn = self.turns.get(turn_id)
            if turn is None:
                return False
            turn.cancelled = True
            self._finish(turn)
            return True

    def stats(self) -> SpeechStats:
        with self._lock:
            live = [t for t in self.turns.values() if t.slot is not None]
            step_times = sorted(self.step_times)
            return SpeechStats(
                **vars(self.decode_steps.step.stats()),
                live_slots=len(live),
                free_slots=len(self.free_slots),
                queued=len(self.waiting),
                steps=self.steps,
                frames=self.frames_out,
                steps_per_s=len(step_times) / sum(step_times) if step_times else 0.0,
                step_ms_p50=1000 * step_times[len(step_times) // 2] if step_times else 0.0,
                step_ms_p95=1000 * step_times[int(len(step_times) * 0.95)] if step_times else 0.0,
                slot_cache_bytes_in_use=sum(t.length for t in live) * self._position_bytes,
                voice_cache_entries=len(self.voice_cache),
                voice_cache_bytes=sum(p.nbytes for p in self.voice_cache.values()),
                step_mode=self.decode_steps.mode,
                voice_prefill=self.voice_prefill.stats(),
                step_ms_by_batch=self.realtime.steps.snapshot_ms(),
                steps_by_batch=dict(sorted(self.steps_by_batch.items())),
                calibration_s=self.realtime.steps.calibration_s,
                realtime_slots=self.realtime.capacity(),
            )

    def headroom(self) -> Headroom:
        """From the event loop. Starts the engine thread where it is not running yet: it also re-probes the curve
        while no turn runs, so a replica that calibrated under contention (one autoscaling added during a burst)
        recovers before its first turn."""
        self._start()
        return self.realtime.headroom()

    def clear_voice_cache(self) -> None:
        with self._lock:
            self.voice_cache.clear()

    async def close(self) -> None:
        for turn_id in list(self.turns):
            self.cancel(turn_id)
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # ---- turn lifecycle -----------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="speech-engine", daemon=True)
            self._thread.start()

    async def _frames(self, turn: _Turn) -> AsyncIterator[GeneratedFrame]:
        try:
            while True:
                item = await turn.output.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel(turn.turn_id)  # no-op once the turn ended; frees it if the consumer left early

    async def _pump(self, turn: _Turn, stream: AsyncIterator[ReasonerPair]) -> None:
        try:
            async for pair in stream:
                with self._lock:
                    turn.pairs.append(pair)
                    self._lock.notify()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a failed Reasoner fails only its own turn
            turn.error = error
        finally:
            with self._lock:
                turn.reasoner_ended = True
                self._lock.notify()
            # Closing the stream frees the Reasoner's request when the turn ends before the text does.
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def _emit(self, turn: _Turn, item) -> None:
        self._loop.call_soon_threadsafe(turn.output.put_nowait, item)

    def _admit_or_queue(self, turn: _Turn) -> None:
        if self.free_slots:
            turn.slot = heapq.heappop(self.free_slots)
        else:
            self.waiting.append(turn)

    def _finish(self, turn: _Turn) -> None:
        """Under the lock, from either thread."""
        self.turns.pop(turn.turn_id, None)
        if turn in self.waiting:
            self.waiting.remove(turn)
        if turn.slot is not None:
            if turn.turn_id in self._in_flight:
                self._slots_to_free.append(turn.slot)  # the running step still writes this cache row
            else:
                self._free_slot(turn.slot)
            turn.slot = None
        if turn.pump is not None:
            self._loop.call_soon_threadsafe(turn.pump.cancel)
        if turn.error is not None:
            self._emit(turn, turn.error)
        elif not turn.cancelled and turn.unsent_text:
            self._emit(turn, GeneratedFrame(codes=None, text_tokens=turn.unsent_text))
        self._emit(turn, _END)
        self._lock.notify()

    def _free_slot(self, slot: int) -> None:
        # Under the lock, possibly on the event loop: no device work here (a turn's first step resets its row).
        heapq.heappush(self.free_slots, slot)
        if self.waiting:
            self._admit_or_queue(self.waiting.popleft())

    # ---- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.speech.device.type == "cpu" and self.settings.cpu_threads is not None:
            use_intra_op_threads(self.settings.cpu_threads)
        try:
            self._step_until_stopped()
        except BaseException as failure:  # an engine bug must fail the live turns, not leave them hanging
            with self._lock:
                for turn in list(self.turns.values()):
                    turn.error = RuntimeError(f"speech engine stopped: {failure!r}")
                    self._finish(turn)
                self._thread = None
            raise

    def _step_until_stopped(self) -> None:
        while True:
            self._reprobe()
            with self._lock:
                self._compact_slots()
                batch = self._collect_ready()
                if not batch:
                    if self._stopping:
                        return
                    self._lock.wait(self.realtime.steps.reprobe_s)  # new work wakes it; so does a re-probe's time
                    continue
                # cancel() may end a turn while the step runs; its slot is freed only after the step.
                self._in_flight = {row.turn.turn_id for row in batch}
            started = time.perf_counter()
            try:
                # Outside the lock: a voice-cache miss costs a backbone forward, and submit()/cancel() must not wait for it.
                new_voices = self._load_voice_prefixes([row for row in batch if row.first_step])
                frames = self.decode_steps.run([row.input for row in batch])
                error = None
            except Exception as failure:  # a failed step fails the turns in it, not the engine
                error = failure
            with self._lock:
                self._in_flight = set()
                while self._slots_to_free:
                    self._free_slot(self._slots_to_free.pop())
                if error is not None:
                    for row in batch:
                        if row.turn.turn_id in self.turns:
                            row.turn.error = error
                            self._finish(row.turn)
                    continue
                self._remember_voices(new_voices)
                elapsed = time.perf_counter() - started
                self.step_times.append(elapsed)
                if not new_voices:  # a voice prefill is once per voice, not the cost of batching
                    self.realtime.steps.record(len(batch), elapsed)
                self.steps_by_batch[len(batch)] += 1
                self.steps += 1
                self._apply(batch, frames)

    def _reprobe(self) -> None:
        """Engine thread, between steps: while fewer turns are live than the estimate allows, measure the bucket
        above it again now and then (model.engines.realtime), so an estimate that contention lowered recovers."""
        self.realtime.reprobe(self.decode_steps.run_padding, self.settings.max_slots - len(self.free_slots))

    def _compact_slots(self) -> None:
        """Under the lock, between steps: move the turn in the highest slot to the lowest free one while that is
        lower, so the live turns fill slots [0, n) and a step's batch is the first rows of the cache."""
        live = sorted((t for t in self.turns.values() if t.slot is not None), key=lambda t: t.slot)
        while live and self.free_slots and self.free_slots[0] < live[-1].slot:
            turn = live.pop()
            target = heapq.heappop(self.free_slots)
            self.decode_steps.move_row(turn.slot, target, turn.length)
            heapq.heappush(self.free_slots, turn.slot)
            turn.slot = target

    def _collect_ready(self) -> list[_Row]:
        """Under the lock: the turns with a slot whose next input is complete."""
        ready = []
        for turn in list(self.turns.values()):
            if turn.slot is None:
                continue
            if turn.error is not None:
                self._finish(turn)
                continue
            row = self._next_row(turn)
            if turn.error is not None:
                self._finish(turn)
            elif row is not None:
                if row.first_step:
                    row.prefix = self.voice_cache.get(turn.voice_key)
                    if row.prefix is not None:
                        self.voice_cache.move_to_end(turn.voice_key)
                ready.append(row)
        return ready

    def _next_row(self, turn: _Turn) -> _Row | None:
        progress = turn.progress
        pair = None
        if progress.wants_reasoner_pair():
            if turn.pairs:
                pair = turn.pairs.popleft()
                progress.add_text(pair[0])
                turn.unsent_text.append(pair[0])
            elif turn.reasoner_ended:
                progress.reasoner_done = True  # the Reasoner stopped without im_end (token limit)
                if progress.steps == 0:
                    turn.error = ValueError(f"turn {turn.turn_id}: the Reasoner produced no text token")
                    return None
            else:
                return None
        # A first step feeds the pair alone: the voice prefix comes first, loaded into the slot when the step runs.
        first_step = progress.steps == 0
        length = (0 if first_step else 1) + (2 if pair is not None else 0)
        return _Row(turn, RowInput(turn.slot, turn.length, length, pair, turn.sampling, turn.seed, progress.steps))

    @torch.inference_mode()
    def _load_voice_prefixes(self, first_steps: list[_Row]) -> dict[str, VoicePrefix]:
        """Engine thread, without the lock (the rows' slots are in flight): copy each first-step turn's voice
        prefix into its slot, prefilling the voices the cache lacks in one forward. Returns the prefixes made."""
        missing = {row.turn.voice_key: row.turn.voice for row in first_steps if row.prefix is None}
        made = dict(zip(missing, self.voice_prefill.run(list(missing.values())))) if missing else {}
        for row in first_steps:
            prefix = row.prefix or made[row.turn.voice_key]
            slot, length = row.input.slot, prefix.length
            self.cache.keys[slot, :, :, :length] = prefix.keys
            self.cache.values[slot, :, :, :length] = prefix.values
            self.cache.visible[slot] = False
            self.cache.visible[slot, :length] = prefix.visible
            row.input.start = length
        return made

    def _remember_voices(self, prefixes: dict[str, VoicePrefix]) -> None:
        """Under the lock."""
        for key, prefix in prefixes.items():
            self.voice_cache[key] = prefix
            self.voice_cache.move_to_end(key)
        if prefixes:
            self._evict_voices()

    def _evict_voices(self) -> None:
        budget = self.settings.voice_cache_mb * 2**20
        while len(self.voice_cache) > 1 and sum(p.nbytes for p in self.voice_cache.values()) > budget:
            self.voice_cache.popitem(last=False)

    def _apply(self, batch: list[_Row], frames: dict[int, list[int]]) -> None:
        """Under the lock."""
        for row in batch:
            turn = row.turn
            if turn.turn_id not in self.turns:  # cancelled while the step ran
                continue
            turn.length = row.input.start + row.input.length
            codes = frames[row.input.slot]
            if turn.progress.add_frame(codes):
                self._emit(turn, GeneratedFrame(codes=codes, text_tokens=turn.unsent_text))
                turn.unsent_text = []
                self.frames_out += 1
            if turn.progress.finished:
                self._finish(turn)


def _voice_key(voice: VoicePrompt) -> str:
    digest = hashlib.sha1()
    for tensor in (voice.transcript_ids, voice.codes):
        digest.update(tensor.to(torch.int64).numpy().tobytes())
    digest.update(str(voice.valid_frames).encode())
    return digest.hexdigest()
