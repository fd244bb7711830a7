"""The offline generator: one turn at a time in one process, the whole model loaded from a checkpoint directory.

`generate_turn` is the reference loop over one turn (batch of one): Reasoner prefill, the speech loop stepping
the Reasoner once per two frames, then one Mimi decode of all frames. The batched engines
(`model.engines`) produce the same greedy frames; the tests hold them to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.chroma.checkpoint import Checkpoint, load_codec, load_speech, load_thinker, resolve_dtype
from model.chroma.codec import decode_frames, encode_voice
from model.chroma.layers import KVCache, StepInputs
from model.chroma.sampling import SamplingBatch, SamplingParams
from model.chroma.speech import SpeechModel
from model.chroma.turn import ReasonerPair, TurnProgress, VoicePrompt, turn_frame_budget, voice_prompt_attend
from model.processing.processor import ChromaProcessor, Conversation, ReasonerInputs
from model.reasoner.hf import ReasonerSession
from model.testing.tiny import uses_random_weights


@dataclass
class TurnResult:
    text_tokens: list[int]
    frames: torch.Tensor  # [T, num_codebooks] long
    audio: torch.Tensor  # [T * frame_size] float32 at `sample_rate`
    sample_rate: int
    text: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def audio_seconds(self) -> float:
        return self.audio.numel() / self.sample_rate

    @property
    def real_time_factor(self) -> float:
        """Generation time / audio duration (< 1 is faster than real time)."""
        return self.timings.get("total_s", 0.0) / self.audio_seconds if self.audio_seconds else float("inf")


class SingleTurnBackbone:
    """Backbone KV cache and addressing for one turn (batch of one): positions equal cache indices."""

    def __init__(self, speech: SpeechModel):
        self.speech = speech
        self.cache: KVCache = speech.allocate_backbone_cache(rows=1)
        self.length = 0

    def step(self, embeds: torch.Tensor, attend: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [L, H] -> (x [1, H], codebook-0 logits [1, V]) at the last new position."""
        device = self.speech.device
        count = embeds.shape[0]
        step = StepInputs.contiguous([0], [self.length], [count], device, attend=None if attend is None else attend[None])
        self.length += count
        return self.speech.backbone_step(embeds[None], self.cache, step, torch.tensor([count - 1], device=device))


@torch.inference_mode()
def speak_turn(
    speech: SpeechModel,
    voice: VoicePrompt,
    next_pair: Callable[[int | None], ReasonerPair],
    max_frames: int,
    sampling: SamplingParams | None = None,
) -> TurnProgress:
    """The speech side of one turn, batch of one: backbone step + decoder frame completion per frame, asking
    `next_pair(previous token)` (None first) for a Reasoner (token, hidden state) pair once per two frames."""
    params = sampling or SamplingParams()
    seed = params.turn_seed()
    progress = TurnProgress(speech.config, turn_frame_budget(speech.config, voice, max_frames))
    backbone = SingleTurnBackbone(speech)
    token, hidden = next_pair(None)
    progress.add_text(token)
    embeds = torch.cat([speech.voice_prompt_embeddings(voice.transcript_ids, voice.codes), speech.reasoner_pair(token, hidden)])
    attend = torch.cat([voice_prompt_attend(voice), torch.ones(2, dtype=torch.bool)])
    while True:
        x, logits = backbone.step(embeds, attend)
        attend = None
        frame = speech.sample_frames(x, logits, SamplingBatch.of([params], [seed], [progress.steps], speech.device))
        progress.add_frame(frame[0].tolist())
        if progress.finished:
            return progress
        embeds = speech.frame_embeddings(frame)
        if progress.wants_reasoner_pair():
            token, hidden = next_pair(token)
            progress.add_text(token)
            embeds = torch.cat([embeds, speech.reasoner_pair(token, hidden)])


@torch.inference_mode()
def generate_turn(
    thinker,
    speech: SpeechModel,
    codec,
    conversation: ReasonerInputs,
    voice: VoicePrompt,
    max_frames: int = 250,
    sampling: SamplingParams | None = None,
    decode_text=None,
) -> TurnResult:
    """One spoken reply, batch of one: Reasoner prefill on the transformers `thinker` module, the speech loop
    stepping the Reasoner once per two frames, then one Mimi decode of all frames."""
    config = speech.config
    started = time.perf_counter()
    session = ReasonerSession(thinker)
    reasoner_s = 0.0

    def next_pair(previous: int | None) -> ReasonerPair:
        nonlocal reasoner_s
        reasoner_started = time.perf_counter()
        pair = session.prefill(conversation) if previous is None else session.step(previous)
        reasoner_s += time.perf_counter() - reasoner_started
        return pair

    progress = speak_turn(speech, voice, next_pair, max_frames, sampling)
    speech_done = time.perf_counter()

    frames = torch.tensor(progress.frames, dtype=torch.long).reshape(-1, config.audio_num_codebooks)
    audio = decode_frames(codec, frames)
    finished = time.perf_counter()
    spoken = [t for t in progress.text_tokens if t != config.im_end_token_id]
    return TurnResult(
        text_tokens=progress.text_tokens,
        frames=frames,
        audio=audio,
        sample_rate=config.sample_rate,
        text=decode_text(spoken) if decode_text else None,
        timings={
            "reasoner_s": reasoner_s,
            "speech_s": speech_done - started - reasoner_s,
            "codec_s": finished - speech_done,
            "total_s": finished - started,
        },
    )


class OfflineChroma:
    """The whole model of one checkpoint in this process: `voice()` clones a voice, `reply()` answers a turn."""

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu"):
        self.path = Path(path)
        self.random_weights = uses_random_weights(self.path)
        checkpoint = Checkpoint(self.path)
        self.config = checkpoint.config
        torch_dtype = resolve_dtype(dtype)
        self.thinker = load_thinker(checkpoint, torch_dtype, device)
        self.speech = load_speech(checkpoint, torch_dtype, device)
        self.codec = load_codec(checkpoint, torch_dtype, device)
        self.processor = ChromaProcessor.from_pretrained(self.path)

    def voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePrompt:
        prompt = self.processor.encode_voice_prompt(transcript, audio, sample_rate)
        return encode_voice(
            self.codec, self.config, torch.as_tensor(prompt.text_ids)[0], torch.as_tensor(prompt.input_values),
            num_samples=prompt.num_samples,
        )

    def reply(
        self, conversation: Conversation, voice: VoicePrompt, max_frames: int = 250, sampling: SamplingParams | None = None
    ) -> TurnResult:
        inputs = self.processor.encode_conversation(conversation)
        return generate_turn(
            self.thinker, self.speech, self.codec, inputs, voice, max_frames=max_frames, sampling=sampling,
            decode_text=self.processor.decode_text,
        )
