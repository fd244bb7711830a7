"""Call audio on the wire: the line formats callers send and receive, streamed in both directions.

Inbound audio is decoded and resampled to the Reasoner's 16 kHz with the resampler's state kept across messages
(so chunk boundaries leave no clicks); outbound reply audio (24 kHz from the codec) is encoded per reply.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import soxr

from model.errors import AudioError
from model.processing.audio import CODEC_RATE, REASONER_RATE, ReplyFormat, StreamingAudioEncoder, decode_audio


class LineFormat(str, Enum):
    PCM16_24K = "pcm16_24k"  # OpenAI Realtime audio/pcm: 16-bit little-endian, 24 kHz, mono
    PCMU = "pcmu"  # G.711 mu-law, 8 kHz
    PCMA = "pcma"  # G.711 A-law, 8 kHz

    @property
    def rate(self) -> int:
        return CODEC_RATE if self is LineFormat.PCM16_24K else 8000

    @property
    def encoding(self) -> str:
        return {"pcm16_24k": "pcm16", "pcmu": "mulaw", "pcma": "alaw"}[self.value]

    @property
    def bytes_per_ms(self) -> float:
        return self.rate * (2 if self is LineFormat.PCM16_24K else 1) / 1000

    @property
    def reply_format(self) -> ReplyFormat:
        return {"pcm16_24k": ReplyFormat.PCM16_24K, "pcmu": ReplyFormat.MULAW_8K, "pcma": ReplyFormat.ALAW_8K}[self.value]


class InboundAudio:
    """A caller's audio messages -> 16 kHz float32, resampled as one stream."""

    # soxr's stream filters hold audio back; measured here per 100 ms messages: 8 -> 16 kHz VHQ 26 ms (HQ 85 ms),
    # 24 -> 16 kHz HQ 11 ms. Every ms held is added to when the end of the caller's speech is seen.
    QUALITY = {8000: "VHQ", CODEC_RATE: "HQ"}

    def __init__(self, line: LineFormat):
        self.line = line
        self.resampler = soxr.ResampleStream(line.rate, REASONER_RATE, 1, dtype="float32", quality=self.QUALITY[line.rate])

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise AudioError("an audio message carried no audio")
        if self.line is LineFormat.PCM16_24K and len(data) % 2:
            raise AudioError(f"audio/pcm is 16-bit: {len(data)} bytes is not a whole number of samples")
        wave, _ = decode_audio(data, sample_rate=self.line.rate, encoding=self.line.encoding)
        return self.resampler.resample_chunk(wave)


class OutboundAudio:
    """One reply's 24 kHz audio -> line bytes, chunk by chunk (`flush` at the reply's end)."""

    def __init__(self, line: LineFormat):
        self.line = line
        self.encoder = StreamingAudioEncoder(line.reply_format, CODEC_RATE)

    def encode(self, audio: np.ndarray) -> bytes:
        return self.encoder.encode(audio)

    def flush(self) -> bytes:
        return self.encoder.flush()
