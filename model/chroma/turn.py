"""The types of one turn that every layer shares: the voice prompt, the interleave state and the budgets.

A *turn* is one exchange: the caller's utterance and the spoken reply to it. The Reasoner produces (token id,
hidden state) pairs; the speech stack turns them into code frames, one Reasoner pair per two frames (the 1:2
interleave, SPEC steps 6-8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.chroma.config import ChromaConfig
from model.errors import InvalidInput

# One Reasoner step: (text token id, its last-layer hidden state after the final norm [hidden]).
ReasonerPair = tuple[int, torch.Tensor]

FRAME_SECONDS = 0.08  # audio per frame: Mimi runs at 12.5 frames/s
FRAMES_PER_TOKEN = 2  # the 1:2 interleave: one Reasoner pair per two frames
TOKEN_SECONDS = FRAMES_PER_TOKEN * FRAME_SECONDS  # reply audio per Reasoner token: 6.25 tokens/s keep a turn real-time


@dataclass
class GeneratedFrame:
    """The speech stack's output, per frame: the SpeechEngine yields these, the codec decodes them."""

    codes: list[int] | None  # the frame's 8 codes; None only for a last, text-only flush
    text_tokens: list[int]  # Reasoner tokens injected since the previous yielded frame


@dataclass
class ReplyChunk:
    """The codec's output as a reply streams: Reasoner tokens, or decoded audio."""

    text_tokens: list[int]
    audio: np.ndarray | None  # PCM float32 mono at the codec's rate
    frames: int  # frames this audio covers
    text_at_frame: int = 0  # the reply frame the tokens entered the Backbone with (the 1:2 interleave)


@dataclass
class VoicePrompt:
    """A cloned voice as the speech stack needs it: transcript ids and the reference audio's Mimi codes."""

    transcript_ids: torch.Tensor  # [n] long, no special tokens
    codes: torch.Tensor  # [F, num_codebooks] long
    valid_frames: int  # frames past ceil(num_samples / frame_size) are masked (padding)


def voice_prompt_attend(voice: VoicePrompt) -> torch.Tensor:
    """Which prompt positions later positions may attend to: all but reference frames past the cutoff."""
    text_len = voice.transcript_ids.numel() + 2
    frames = torch.arange(voice.codes.shape[0]) < voice.valid_frames
    return torch.cat([torch.ones(text_len, dtype=torch.bool), frames, torch.ones(1, dtype=torch.bool)])


@dataclass
class TurnProgress:
    """Where one turn stands in the interleave and whether it is done (SPEC steps 6-8).

    `steps` counts backbone steps taken. The Reasoner pair is injected at steps 0, 2, 4, ... until the Reasoner
    has produced im_end (that pair is still injected). A turn stops on a frame whose codebooks 0..6 are all
    codebook_eos, or once `max_frames` frames are kept; a frame whose codes sum to 0 is not kept."""

    config: ChromaConfig
    max_frames: int
    steps: int = 0
    reasoner_done: bool = False
    finished: bool = False
    text_tokens: list[int] = field(default_factory=list)
    frames: list[list[int]] = field(default_factory=list)

    def wants_reasoner_pair(self) -> bool:
        return not self.reasoner_done and self.steps % FRAMES_PER_TOKEN == 0

    def add_text(self, token: int) -> None:
        self.text_tokens.append(token)
        self.reasoner_done = token == self.config.im_end_token_id

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


def reasoner_tokens_for(max_frames: int) -> int:
    """The most Reasoner tokens a reply of `max_frames` frames can take in: one before the first frame, then one
    per two frames. Asking the Reasoner for more only makes it generate text nobody will speak."""
    return 1 + (max_frames + FRAMES_PER_TOKEN - 1) // FRAMES_PER_TOKEN


def turn_frame_budget(config: ChromaConfig, voice: VoicePrompt, max_frames: int) -> int:
    """Frames that fit in the backbone context after the prompt (each frame costs at most 1.5 positions
    on average: one per frame plus a Reasoner pair every two frames)."""
    prompt = voice.transcript_ids.numel() + 2 + voice.codes.shape[0] + 1 + 2
    context = config.backbone_config.max_position_embeddings
    room = context - prompt
    if room <= 0:
        raise InvalidInput(
            f"voice prompt takes {prompt} positions, more than the backbone context of {context}: "
            "use a shorter reference clip"
        )
    return min(max_frames, (room * 2) // 3)
