"""The SpeechEngine's voice-prompt prefill: the prompts of every voice a step needs and the voice cache lacks, in ONE
batched Backbone forward.

Turns that arrive together start in the same step: their voice prompts (SPEC step 1) are prefilled together here,
then their first Reasoner pairs run in that step's decode forward with everything else. Row i of a scratch cache
takes voice i; the engine copies each voice's keys and values out (`VoicePrefix`) into its voice cache and its turns'
slots. A voice the cache holds is never prefilled again.

Shapes follow `model.engines.graphs` like the decode step's: eagerly at exact shapes (B voices, the longest prompt),
or padded to (batch bucket 1, 2, 4, ... up to `max_voices`, length bucket 64, 128, ... up to the context), each
bucket settled once at construction (on CUDA its SDPA backend, and in the graph modes its graph). Padding positions
write only the scratch column; padding rows write nothing anyone reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.chroma.layers import StepInputs
from model.chroma.speech import SpeechModel
from model.chroma.turn import VoicePrompt, voice_prompt_attend
from model.engines.graphs import BucketedStep, StepStats, bucket_for, power_of_two_buckets
from model.settings import CompileBackend

SMALLEST_LENGTH_BUCKET = 64


@dataclass(frozen=True)
class VoicePrefillStats(StepStats):
    voices: int  # voice prompts prefilled
    forwards: int  # the forwards that prefilled them


@dataclass
class VoicePrefix:
    """Backbone keys/values of one voice prompt, ready to copy into a slot."""

    keys: torch.Tensor  # [layers, kv_heads, P, head_dim]
    values: torch.Tensor
    visible: torch.Tensor  # [P]

    @property
    def length(self) -> int:
        return self.visible.shape[0]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.visible.nbytes


class VoicePrefill:
    def __init__(self, speech: SpeechModel, mode: str, max_voices: int, compile_backend: CompileBackend = "inductor"):
        self.speech, self.mode, self.max_voices = speech, mode, max_voices
        capacity = speech.config.backbone_config.max_position_embeddings  # no prompt is longer (turn_frame_budget)
        self.scratch = speech.allocate_backbone_cache(rows=max_voices, capacity=capacity)
        device, hidden = speech.device, speech.config.backbone_config.hidden_size
        # Static inputs: row i holds voice i's prompt embeddings, its length and which positions later ones attend to.
        self._embeds = torch.zeros(max_voices, capacity, hidden, device=device, dtype=speech.dtype)
        self._lengths = torch.zeros(max_voices, dtype=torch.long, device=device)
        self._attend = torch.zeros(max_voices, capacity, dtype=torch.bool, device=device)
        self.batch_buckets = power_of_two_buckets(max_voices)
        self.length_buckets = power_of_two_buckets(capacity, min(SMALLEST_LENGTH_BUCKET, capacity))
        self.step = BucketedStep(self._forward, mode, compile_backend, name="voice prefill")
        self.voices = 0  # prompts prefilled
        self.forwards = 0
        if mode != "eager":
            self.step.prepare(
                (((count, width), self._args(count, width)) for count in reversed(self.batch_buckets)
                 for width in reversed(self.length_buckets)),
                device,
            )

    @torch.inference_mode()
    def run(self, voices: list[VoicePrompt]) -> list[VoicePrefix]:
        """Each voice's prefix, in order, from one forward per `max_voices` voices."""
        prefixes = []
        for first in range(0, len(voices), self.max_voices):
            prefixes += self._run(voices[first:first + self.max_voices])
        return prefixes

    def _run(self, voices: list[VoicePrompt]) -> list[VoicePrefix]:
        speech = self.speech
        lengths = []
        for row, voice in enumerate(voices):
            embeds = speech.voice_prompt_embeddings(voice.transcript_ids, voice.codes)  # [P, H]
            length = embeds.shape[0]
            self._embeds[row, :length] = embeds
            self._attend[row, :length] = voice_prompt_attend(voice).to(self._attend.device, non_blocking=True)
            lengths.append(length)
        count, width = len(voices), max(lengths)
        self._lengths[:count].copy_(torch.tensor(lengths), non_blocking=True)
        if self.mode != "eager":
            count, width = bucket_for(count, self.batch_buckets), bucket_for(width, self.length_buckets)
            self._lengths[len(voices):count] = 0  # padding rows
        self.step((count, width), *self._args(count, width))
        self.voices += len(voices)
        self.forwards += 1
        scratch = self.scratch
        return [
            VoicePrefix(scratch.keys[row, :, :, :length].clone(), scratch.values[row, :, :, :length].clone(),
                        scratch.visible[row, :length].clone())
            for row, length in enumerate(lengths)
        ]

    def _args(self, count: int, width: int) -> tuple:
        return self._embeds[:count, :width], self._lengths[:count], self._attend[:count, :width], width

    def _forward(self, embeds: torch.Tensor, lengths: torch.Tensor, attend: torch.Tensor, width: int) -> None:
        """Prompt embeddings [B, width, H] of lengths [B] into scratch rows [0, B); attend [B, width]."""
        step = StepInputs.first_rows(torch.zeros_like(lengths), lengths, width, width, attend=attend)
        self.speech.backbone.model(embeds, self.scratch, step)

    def stats(self) -> VoicePrefillStats:
        return VoicePrefillStats(**vars(self.step.stats()), voices=self.voices, forwards=self.forwards)
