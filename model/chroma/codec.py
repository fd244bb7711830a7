"""One-shot use of the Mimi codec: a voice prompt from reference audio, and a waveform from code frames.

The streaming, batched decode of live replies is `model.engines.codec.CodecEngine`.
"""

from __future__ import annotations

import math

import torch

from model.chroma.config import ChromaConfig
from model.chroma.turn import VoicePrompt
from model.errors import InvalidInput


@torch.inference_mode()
def encode_voice(
    codec, config: ChromaConfig, transcript_ids: torch.Tensor, audio_24k: torch.Tensor, num_samples: int | None = None
) -> VoicePrompt:
    """audio_24k: [S] or [1, 1, S] float waveform at the codec's rate; `num_samples` is the valid length when
    the waveform carries padding."""
    audio = audio_24k.reshape(1, 1, -1).to(codec.device, codec.dtype)
    if audio.shape[-1] == 0:
        raise InvalidInput("voice prompt audio is empty")
    if transcript_ids.numel() == 0:
        raise InvalidInput("voice prompt transcript is empty")
    codes = codec.encode(audio).audio_codes[0, : config.audio_num_codebooks].T.contiguous()
    return VoicePrompt(
        transcript_ids=transcript_ids.reshape(-1).cpu(),
        codes=codes.cpu(),
        valid_frames=math.ceil((num_samples or audio.shape[-1]) / config.audio_frame_freq),
    )


@torch.inference_mode()
def decode_frames(codec, frames: torch.Tensor) -> torch.Tensor:
    """frames [T, 8] -> waveform [T * frame_size] float32 (one-shot Mimi decode, codebooks as channels)."""
    if frames.shape[0] == 0:
        return torch.zeros(0)
    codes = frames.T[None].to(codec.device)
    return codec.decode(codes).audio_values[0, 0].float().cpu()
