"""The Chroma generation algorithm (SPEC "One turn, step by step"), written step-wise.

Pieces, each reusable by the batched engine and the Reasoner:
- `ThinkerSession`: one conversation on the transformers thinker: prefill, then one token per step, yielding
  (token id, last-layer hidden state after the final norm).
- `encode_voice`: Mimi codes of the reference audio -> `VoicePrompt`.
- `TurnProgress`: the 1:2 text/audio interleave and the stop rule for one turn.
- `generate_turn`: the offline loop over one turn (batch of one) built from the above.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import ChromaConfig
from .layers import KVCache, StepInputs
from .processor import ThinkerInputs
from .sampling import SamplingParams, SamplingState
from .speech import SpeechModel


class ThinkerSession:
    """One conversation's thinker state. Rotary positions are passed explicitly (prefill: Qwen2.5-Omni's 3D
    rope index; then cache length + that conversation's rope delta), so the module keeps no per-conversation
    state and several sessions can share one thinker."""

    def __init__(self, thinker):
        from transformers import DynamicCache

        self.thinker = thinker
        self.cache = DynamicCache(config=thinker.config.text_config)
        self.length = 0
        self.rope_delta = 0

    @torch.inference_mode()
    def prefill(self, inputs: ThinkerInputs) -> tuple[int, torch.Tensor]:
        device = self.thinker.device
        input_ids = inputs.input_ids.to(device)
        attention_mask = inputs.attention_mask.to(device)
        audio_lengths = None
        if inputs.feature_attention_mask is not None:
            audio_lengths = inputs.feature_attention_mask.sum(-1).to(device)
        position_ids, rope_deltas = self.thinker.get_rope_index(
            input_ids, None, None, attention_mask, False, audio_lengths
        )
        self.rope_delta = int(rope_deltas.reshape(-1)[0])
        out = self.thinker(
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_features=None if inputs.input_features is None else inputs.input_features.to(device, self.thinker.dtype),
            feature_attention_mask=None if inputs.feature_attention_mask is None else inputs.feature_attention_mask.to(device),
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self.length = input_ids.shape[1]
        return self._pick(out)

    @torch.inference_mode()
    def step(self, token: int) -> tuple[int, torch.Tensor]:
        device = self.thinker.device
        position = torch.full((3, 1, 1), self.length + self.rope_delta, device=device, dtype=torch.long)
        out = self.thinker(
            input_ids=torch.tensor([[token]], device=device),
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self.length += 1
        return self._pick(out)

    @staticmethod
    def _pick(out) -> tuple[int, torch.Tensor]:
        # The reference thinker is always greedy.
        return int(out.logits[0, -1].argmax()), out.hidden_states[-1][0, -1]


@dataclass
class VoicePrompt:
    """A cloned voice as the speech stack needs it: transcript ids and the reference audio's Mimi codes."""

    transcript_ids: torch.Tensor  # [n] long, no special tokens
    codes: torch.Tensor  # [F, num_codebooks] long
    valid_frames: int  # frames past ceil(num_samples / frame_size) are masked (padding)


@torch.inference_mode()
def encode_voice(
    codec, config: ChromaConfig, transcript_ids: torch.Tensor, audio_24k: torch.Tensor, num_samples: int | None = None
) -> VoicePrompt:
    """audio_24k: [S] or [1, 1, S] float waveform at the codec's rate; `num_samples` is the valid length when
    the waveform carries padding."""
    audio = audio_24k.reshape(1, 1, -1).to(codec.device, codec.dtype)
    if audio.shape[-1] == 0:
        raise ValueError("voice prompt audio is empty")
    if transcript_ids.numel() == 0:
        raise ValueError("voice prompt transcript is empty")
    codes = codec.encode(audio).audio_codes[0, : config.audio_num_codebooks].T.contiguous()
    return VoicePrompt(
        transcript_ids=transcript_ids.reshape(-1).cpu(),
        codes=codes.cpu(),
        valid_frames=math.ceil((num_samples or audio.shape[-1]) / config.audio_frame_freq),
    )


def voice_prompt_attend(voice: VoicePrompt) -> torch.Tensor:
    """Which prompt positions later positions may attend to: all but reference frames past the cutoff."""
    text_len = voice.transcript_ids.numel() + 2
    frames = torch.arange(voice.codes.shape[0]) < voice.valid_frames
    return torch.cat([torch.ones(text_len, dtype=torch.bool), frames, torch.ones(1, dtype=torch.bool)])


@dataclass
class TurnProgress:
    """Where one turn stands in the interleave and whether it is done (SPEC steps 6-8).

    `steps` counts backbone steps taken. The thinker pair is injected at steps 0, 2, 4, ... until the thinker
    has produced im_end (that pair is still injected). A turn stops on a frame whose codebooks 0..6 are all
    codebook_eos, or once `max_frames` frames are kept; a frame whose codes sum to 0 is not kept."""

    config: ChromaConfig
    max_frames: int
    steps: int = 0
    thinker_done: bool = False
    finished: bool = False
    text_tokens: list[int] = field(default_factory=list)
    frames: list[list[int]] = field(default_factory=list)

    def wants_thinker_pair(self) -> bool:
        return not self.thinker_done and self.steps % 2 == 0

    def add_text(self, token: int) -> None:
        self.text_tokens.append(token)
        self.thinker_done = token == self.config.im_end_token_id

    def add_frame(self, frame: list[int]) -> bool:
        """Record a generated frame; returns whether it is kept (part of the output)."""
        self.steps += 1
        kept = sum(frame) != 0
        if kept:
            self.frames.append(frame)
        eos = self.config.codebook_eos_token_id
        stop_codebooks = self.config.audio_num_codebooks - 1
        if all(code == eos for code in frame[:stop_codebooks]) or len(self.frames) >= self.max_frames:
            self.finished = True
        return kept


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


def thinker_tokens_for(max_frames: int) -> int:
    """The most thinker tokens a reply of `max_frames` frames can take in: one before the first frame, then one
    per two frames. Asking the Reasoner for more only makes it generate text nobody will speak."""
    return 1 + (max_frames + 1) // 2


def turn_frame_budget(speech: SpeechModel, voice: VoicePrompt, max_frames: int) -> int:
    """Frames that fit in the backbone context after the prompt (each frame costs at most 1.5 positions
    on average: one per frame plus a thinker pair every two frames)."""
    prompt = voice.transcript_ids.numel() + 2 + voice.codes.shape[0] + 1 + 2
    room = speech.config.backbone_config.max_position_embeddings - prompt
    if room <= 0:
        raise ValueError(
            f"voice prompt takes {prompt} positions, more than the backbone context of "
            f"{speech.config.backbone_config.max_position_embeddings}: use a shorter reference clip"
        )
    return min(max_frames, (room * 2) // 3)


@torch.inference_mode()
def speak_turn(
    speech: SpeechModel,
    voice: VoicePrompt,
    next_pair: Callable[[int | None], tuple[int, torch.Tensor]],
    max_frames: int,
    sampling: SamplingParams | None = None,
) -> TurnProgress:
    """The speech side of one turn, batch of one: backbone step + decoder frame completion per frame, asking
    `next_pair(previous token)` (None first) for a thinker (token, hidden state) once per two frames."""
    sampling_state = [SamplingState(sampling or SamplingParams(), speech.device)]
    progress = TurnProgress(speech.config, turn_frame_budget(speech, voice, max_frames))
    backbone = SingleTurnBackbone(speech)
    token, hidden = next_pair(None)
    progress.add_text(token)
    embeds = torch.cat([speech.voice_prompt_embeddings(voice.transcript_ids, voice.codes), speech.thinker_pair(token, hidden)])
    attend = torch.cat([voice_prompt_attend(voice), torch.ones(2, dtype=torch.bool)])
    while True:
        x, logits = backbone.step(embeds, attend)
        attend = None
        frame = speech.complete_frames(x, speech.sample(logits, sampling_state), sampling_state)
        progress.add_frame(frame[0].tolist())
        if progress.finished:
            return progress
        embeds = speech.frame_embeddings(frame)
        if progress.wants_thinker_pair():
            token, hidden = next_pair(token)
            progress.add_text(token)
            embeds = torch.cat([embeds, speech.thinker_pair(token, hidden)])


@torch.inference_mode()
def generate_turn(
    thinker,
    speech: SpeechModel,
    codec,
    conversation: ThinkerInputs,
    voice: VoicePrompt,
    max_frames: int = 250,
    sampling: SamplingParams | None = None,
    decode_text=None,
) -> TurnResult:
    """One spoken reply, batch of one: thinker prefill, the speech loop stepping the thinker once per two
    frames, then one Mimi decode of all frames."""
    config = speech.config
    started = time.perf_counter()
    session = ThinkerSession(thinker)
    thinker_s = 0.0

    def next_pair(previous: int | None) -> tuple[int, torch.Tensor]:
        nonlocal thinker_s
        thinker_started = time.perf_counter()
        pair = session.prefill(conversation) if previous is None else session.step(previous)
        thinker_s += time.perf_counter() - thinker_started
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
            "thinker_s": thinker_s,
            "speech_s": speech_done - started - thinker_s,
            "codec_s": finished - speech_done,
            "total_s": finished - started,
        },
    )


@torch.inference_mode()
def decode_frames(codec, frames: torch.Tensor) -> torch.Tensor:
    """frames [T, 8] -> waveform [T * frame_size] float32 (one-shot Mimi decode, codebooks as channels)."""
    if frames.shape[0] == 0:
        return torch.zeros(0)
    codes = frames.T[None].to(codec.device)
    return codec.decode(codes).audio_values[0, 0].float().cpu()
