"""The SpeechEngine's batched decode step: its static input buffers, its buckets and how it runs.

The step itself is model math (`SpeechModel.decode_step`): batch row i is cache row i, so a step of B rows reads
cache rows [0, B) as a view (the engine keeps its live turns in the lowest slots). This module turns the engine's
per-turn inputs into that step's tensors and runs it in one of the modes of `model.engines.graphs`:
- "eager": B = the highest ready slot + 1, width and kv_len exact;
- the bucketed modes ("padded", "cuda_graphs", "compiled", "compiled_graphs"): B rounded up to a batch bucket (1, 2,
  4, ..., max_slots), width to 1 or 3, kv_len to a power of two from 64 (up to the cache capacity). Rows past the
  real ones are padding (length 0). On CUDA every (B, width, kv_len) is settled at construction (its SDPA backend;
  in the graph modes its capture, the only time a graph is built), largest first.

A voice-prompt prefill is not a decode step: `model.engines.voice_prefill` runs the prompts of the voices a step
needs in one forward, once per voice (the engine caches their keys/values). The first step after it (the Reasoner pair alone, 2 positions) and frame + pair steps (3) share the width-3 graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.chroma.layers import KVCache
from model.chroma.sampling import SamplingBatch, SamplingParams
from model.chroma.speech import DecodeInputs, SpeechModel
from model.engines.graphs import BucketedStep, bucket_for, power_of_two_buckets
from model.settings import CompileBackend

WIDTHS = (1, 3)  # a frame alone; a frame and a Reasoner pair (or a first step's pair alone)
SMALLEST_KV_BUCKET = 64

# Columns of the step's integer inputs, one host-to-device copy per step.
START, LENGTH, TOKEN, TOP_K, SEED, FRAME = range(6)


@dataclass
class RowInput:
    """One ready turn's part of a step (its slot is its batch row)."""

    slot: int
    start: int  # cache column of its first new position
    length: int  # 1, 2 or 3: see DecodeInputs
    pair: tuple[int, torch.Tensor] | None  # the Reasoner (token, hidden state) it injects, if any
    sampling: SamplingParams
    seed: int
    frame: int  # frames the turn has produced so far


class DecodeSteps:
    def __init__(self, speech: SpeechModel, cache: KVCache, mode: str, compile_backend: CompileBackend = "inductor"):
        self.speech, self.cache, self.mode = speech, cache, mode
        rows, hidden = cache.keys.shape[0], speech.config.backbone_config.hidden_size
        device = speech.device
        # Each slot's previous frame embedded: the first input of its next step, written by the step itself.
        self.frame_embedding = torch.zeros(rows, hidden, device=device, dtype=speech.dtype)
        # Static inputs for up to `rows` rows; a step of B rows uses their first B rows.
        self._ints = torch.zeros(rows, 6, dtype=torch.long, device=device)
        self._temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self._hidden = torch.zeros(rows, hidden, dtype=torch.float32, device=device)
        pinned = device.type == "cuda"
        self._host_ints = torch.zeros(rows, 6, dtype=torch.long, pin_memory=pinned)
        self._host_temperature = torch.zeros(rows, dtype=torch.float32, pin_memory=pinned)
        self._host_hidden = torch.zeros(rows, hidden, dtype=torch.float32, pin_memory=pinned)
        self.batch_buckets = power_of_two_buckets(rows)
        self.kv_buckets = power_of_two_buckets(cache.capacity, min(SMALLEST_KV_BUCKET, cache.capacity))
        self.step = BucketedStep(speech.decode_step, mode, compile_backend, name="speech step")
        if self.padded:
            self._prepare_buckets()

    @property
    def padded(self) -> bool:
        return self.mode != "eager"

    @property
    def bucket_steps(self) -> dict[tuple[int, int, int], int]:
        """Steps run per (batch, width, kv_len) bucket, in the bucketed modes."""
        return {key: bucket.steps for key, bucket in self.step.buckets.items() if bucket.steps}

    def move_row(self, source: int, target: int, length: int) -> None:
        """Move a turn's state from one slot to another (the engine compacts its slots)."""
        cache = self.cache
        cache.keys[target, :, :, :length] = cache.keys[source, :, :, :length]
        cache.values[target, :, :, :length] = cache.values[source, :, :, :length]
        cache.visible[target] = cache.visible[source]
        self.frame_embedding[target] = self.frame_embedding[source]

    @torch.inference_mode()
    def run(self, rows: list[RowInput]) -> dict[int, list[int]]:
        """One step over the ready rows -> {slot: its new frame's 8 codes}. The one host sync: reading them."""
        count = 1 + max(row.slot for row in rows)
        width = max(row.length for row in rows)
        kv_len = max(row.start + row.length for row in rows)
        if self.padded:
            count, width, kv_len = bucket_for(count, self.batch_buckets), bucket_for(width, WIDTHS), bucket_for(kv_len, self.kv_buckets)
        inputs = self._fill(rows, count, greedy_only=not self.padded and all(row.sampling.greedy for row in rows))
        frames = self.step((count, width, kv_len), self.cache, self.frame_embedding, inputs, width, kv_len)
        codes = frames.cpu().tolist()
        return {row.slot: codes[row.slot] for row in rows}

    @torch.inference_mode()
    def run_padding(self, count: int) -> None:
        """A step of `count` padding rows at the widest shape (width 3, the whole cache read): what a step of that
        many rows costs at most, changing no turn's state (padding rows write only the cache's scratch column and
        keep their frame embeddings), so it may run between the live turns' steps. Calibration and re-probes."""
        kv_len = self.cache.capacity
        inputs = self._fill([], count, greedy_only=False)
        self.step((count, WIDTHS[-1], kv_len), self.cache, self.frame_embedding, inputs, WIDTHS[-1], kv_len).cpu()

    def _fill(self, rows: list[RowInput], count: int, greedy_only: bool) -> DecodeInputs:
        """Write the rows' inputs to the first `count` static rows (the others are padding)."""
        table = [[0, 0, 0, 1, 0, 0] for _ in range(count)]  # padding rows: length 0
        temperatures = [0.0] * count
        for row in rows:
            table[row.slot] = [row.start, row.length, row.pair[0] if row.pair else 0, row.sampling.top_k, row.seed, row.frame]
            temperatures[row.slot] = row.sampling.temperature
        ints, temperature, hidden = self._host_ints[:count], self._host_temperature[:count], self._host_hidden[:count]
        ints.copy_(torch.tensor(table))
        temperature.copy_(torch.tensor(temperatures))
        # Rows without a pair keep stale hidden states: they only reach padding positions, which nobody reads.
        with_pair = [row for row in rows if row.pair is not None]
        if with_pair:
            hidden[[row.slot for row in with_pair]] = torch.stack([row.pair[1].to("cpu", torch.float32) for row in with_pair])
        self._ints[:count].copy_(ints, non_blocking=True)
        self._temperature[:count].copy_(temperature, non_blocking=True)
        self._hidden[:count].copy_(hidden, non_blocking=True)
        return self._inputs(count, greedy_only)

    def _inputs(self, count: int, greedy_only: bool = False) -> DecodeInputs:
        ints = self._ints[:count]
        return DecodeInputs(
            start=ints[:, START], length=ints[:, LENGTH], token=ints[:, TOKEN], hidden=self._hidden[:count],
            sampling=SamplingBatch(
                temperature=self._temperature[:count], top_k=ints[:, TOP_K], seed=ints[:, SEED], frame=ints[:, FRAME],
                greedy_only=greedy_only,
            ),
        )

    @torch.inference_mode()
    def _prepare_buckets(self) -> None:
        """Every (batch, width, kv_len) bucket, largest first so the smaller graphs reuse its memory. The static inputs
        hold zeros, i.e. padding rows only: a bucket's runs here change no turn's state."""
        self._ints.zero_()
        self.step.prepare(
            (((count, width, kv_len), (self.cache, self.frame_embedding, self._inputs(count), width, kv_len))
             for count in reversed(self.batch_buckets) for width in WIDTHS for kv_len in reversed(self.kv_buckets)),
            self.speech.device,
        )
