"""Audio decoding, encoding and resampling for caller and voice-prompt audio.

Everything inside the stack is mono float32 in [-1, 1]; this module is the one place that turns
bytes (WAV, FLAC, OGG, raw PCM16, G.711 mu-law) into that form and back.
"""

from __future__ import annotations

import io
import os
import struct
from enum import Enum

import numpy as np
import soundfile as sf
import soxr

from model.errors import AudioError

REASONER_RATE = 16000  # the Reasoner's audio input rate: caller audio is resampled to it and kept at it
CODEC_RATE = 24000  # Mimi's rate: voice prompts in, reply audio out
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MULAW_DEFAULT_RATE = 8000

# G.711 mu-law constants: samples are biased by 0x84 before the segment search and clipped so the
# biased value still fits in 15 bits.
_MULAW_BIAS = 0x84
_MULAW_CLIP = 32635
# A biased magnitude below 2**(8+e) falls in segment e.
_MULAW_SEGMENT_ENDS = np.array([1 << (8 + e) for e in range(7)], dtype=np.int32)
# WAV writers that stream to a pipe cannot seek back to fill in the data size and leave these.
_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def _mulaw_decode_table() -> np.ndarray:
    """Linear value of every mu-law byte, as in the ITU G.711 reference decoder (int16 scale)."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


_MULAW_TABLE = _mulaw_decode_table()

# G.711 A-law: 13-bit magnitudes in 8 segments, even bits inverted (XOR 0x55) on the line.
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _alaw_decode_table() -> np.ndarray:
    """Linear value of every A-law byte, as in the ITU G.711 reference decoder (int16 scale)."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (codes & 0x70) >> 4
    magnitude = ((codes & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    magnitude = np.where(segment > 1, magnitude << np.maximum(segment - 1, 0), magnitude)
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


_ALAW_TABLE = _alaw_decode_table()


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"unsupported sample rate {rate} Hz; expected {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )


def _finish(wave: np.ndarray, rate: int, what: str) -> tuple[np.ndarray, int]:
    """Common checks on a decoded [frames, channels] or [frames] array."""
    if wave.ndim == 2:
        if wave.shape[1] != 1:
            raise AudioError(f"{what} audio has {wave.shape[1]} channels; send mono audio")
        wave = wave[:, 0]
    if wave.size == 0:
        raise AudioError(f"{what} audio has zero samples")
    if not np.isfinite(wave).all():
        raise AudioError(f"{what} audio contains NaN or infinite samples")
    _check_rate(rate)
    # Float WAV/FLAC may overshoot full scale; everything downstream assumes [-1, 1].
    return np.clip(wave, -1.0, 1.0).astype(np.float32, copy=False), rate


def _sniff_container(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    raise AudioError(
        "unknown audio format: not WAV, FLAC or OGG; pass encoding='pcm16' or 'mulaw' for raw audio"
    )


def _check_wav_not_truncated(data: bytes) -> None:
    """libsndfile silently returns the samples that are there; a cut-off upload should fail instead."""
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        if chunk_id == b"data":
            present = len(data) - pos - 8
            if size not in _WAV_UNKNOWN_SIZES and present < size:
                raise AudioError(
                    f"WAV audio is truncated: data chunk declares {size} bytes but only {present} are present"
                )
            return
        pos += 8 + size + (size & 1)  # chunks are word aligned
    raise AudioError("WAV audio is truncated or corrupt: no data chunk")


def _read_container(data: bytes, container: str) -> tuple[np.ndarray, int]:
    if container == "WAV":
        _check_wav_not_truncated(data)
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioError(f"could not read {container} audio: {exc.error_string}") from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"could not read {container} audio: {exc}") from exc
    return _finish(wave, int(rate), container)


def decode_audio(
    data: bytes, *, sample_rate: int | None = None, encoding: str | None = None
) -> tuple[np.ndarray, int]:
    """Decode audio bytes to (mono float32 wave in [-1, 1], sample rate).

    With no encoding the container (WAV, FLAC, OGG) is detected from its magic bytes and its header
    gives the rate; `sample_rate`, if also given, must agree. Raw audio needs an encoding: "pcm16"
    (little-endian, needs `sample_rate`), "mulaw" or "alaw" (G.711, 8000 Hz unless told otherwise).
    """
    if not data:
        raise AudioError("audio is empty (0 bytes)")
    if encoding is None:
        data = bytes(data)
        wave, rate = _read_container(data, _sniff_container(data))
        if sample_rate is not None and sample_rate != rate:
            raise AudioError(f"audio header says {rate} Hz but sample_rate={sample_rate} was given")
        return wave, rate
    if encoding == "pcm16":
        if sample_rate is None:
            raise AudioError("pcm16 audio needs sample_rate")
        if len(data) % 2:
            raise AudioError(f"pcm16 audio has an odd byte count ({len(data)}); samples are 2 bytes")
        return _finish(pcm16_wave(data), sample_rate, "pcm16")
    if encoding in ("mulaw", "alaw"):
        rate = MULAW_DEFAULT_RATE if sample_rate is None else sample_rate
        table = _MULAW_TABLE if encoding == "mulaw" else _ALAW_TABLE
        wave = table[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0
        return _finish(wave, rate, encoding)
    raise AudioError(f"unknown audio encoding {encoding!r}; expected 'pcm16', 'mulaw', 'alaw' or none")


def load_audio_file(
    path: str | os.PathLike[str], *, sample_rate: int | None = None, encoding: str | None = None
) -> tuple[np.ndarray, int]:
    """Read and decode an audio file with the same rules as `decode_audio`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise AudioError(f"audio file not found: {os.fspath(path)}") from exc
    except OSError as exc:
        raise AudioError(f"could not read audio file {os.fspath(path)}: {exc.strerror}") from exc
    return decode_audio(data, sample_rate=sample_rate, encoding=encoding)


def _as_mono(wave: np.ndarray) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise AudioError(f"expected mono audio as a 1-D array, got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise AudioError("audio contains NaN or infinite samples")
    return wave


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono audio with soxr (HQ); returns float32."""
    wave = _as_mono(wave)
    if from_rate <= 0 or to_rate <= 0:
        raise AudioError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate:
        return wave
    return soxr.resample(wave, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def _to_int16(wave: np.ndarray) -> np.ndarray:
    return np.round(np.clip(_as_mono(wave), -1.0, 1.0) * 32767.0).astype(np.int16)


def pcm16_bytes(wave: np.ndarray) -> bytes:
    """Mono float audio -> little-endian 16-bit PCM bytes."""
    return _to_int16(wave).astype("<i2").tobytes()


def pcm16_wave(data: bytes) -> np.ndarray:
    """Little-endian 16-bit PCM bytes -> mono float32 audio in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def encode_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    """Mono PCM16 WAV bytes."""
    _check_rate(sample_rate)
    buf = io.BytesIO()
    sf.write(buf, _to_int16(wave), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_wav(path: str | os.PathLike[str], wave: np.ndarray, sample_rate: int) -> None:
    with open(path, "wb") as f:
        f.write(encode_wav(wave, sample_rate))


def encode_mulaw(wave: np.ndarray) -> bytes:
    """G.711 mu-law bytes (one per sample); the caller resamples to the line rate (8 kHz) first."""
    linear = _to_int16(wave).astype(np.int32)
    sign = np.where(linear < 0, 0x80, 0x00)
    biased = np.minimum(np.abs(linear), _MULAW_CLIP) + _MULAW_BIAS
    exponent = np.searchsorted(_MULAW_SEGMENT_ENDS, biased, side="right")
    mantissa = (biased >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def encode_alaw(wave: np.ndarray) -> bytes:
    """G.711 A-law bytes (one per sample); the caller resamples to the line rate (8 kHz) first."""
    linear = _to_int16(wave).astype(np.int32) >> 3  # 13-bit
    positive = linear >= 0
    magnitude = np.where(positive, linear, -linear - 1)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, magnitude, side="left")
    shift = np.where(segment < 2, 1, segment)
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ np.where(positive, 0xD5, 0x55)).astype(np.uint8).tobytes()


class ReplyFormat(str, Enum):
    """Streamed reply audio formats, by the name clients use."""

    PCM16_24K = "pcm16_24k"
    PCM16_16K = "pcm16_16k"
    MULAW_8K = "mulaw_8k"
    ALAW_8K = "alaw_8k"
    WAV = "wav"

    @property
    def sample_rate(self) -> int:
        return {"pcm16_24k": 24000, "pcm16_16k": 16000, "mulaw_8k": 8000, "alaw_8k": 8000, "wav": 24000}[self.value]

    @property
    def media_type(self) -> str:
        return {
            "pcm16_24k": "audio/pcm;rate=24000",
            "pcm16_16k": "audio/pcm;rate=16000",
            "mulaw_8k": "audio/basic",
            "alaw_8k": "audio/pcma",
            "wav": "audio/wav",
        }[self.value]


class StreamingAudioEncoder:
    """Turns a reply's float chunks (at the codec's rate) into bytes of one `ReplyFormat`, chunk by chunk.

    Resampling keeps its filter state between chunks (soxr's stream API), so the bytes of a chunked reply equal
    those of the whole reply; a WAV stream starts with a header whose sizes say "unknown length" (0xFFFFFFFF),
    as streaming writers do."""

    def __init__(self, reply_format: ReplyFormat, source_rate: int):
        self.format = ReplyFormat(reply_format)
        self._resampler = None
        if source_rate != self.format.sample_rate:
            # MQ: soxr's HQ stream filter holds back 66 ms of a 24 -> 8 kHz reply (MQ 12 ms), which the caller
            # would wait for before the first audio; MQ is transparent at telephone bandwidth.
            self._resampler = soxr.ResampleStream(source_rate, self.format.sample_rate, 1, dtype="float32", quality="MQ")
        self._header_sent = self.format is not ReplyFormat.WAV

    def encode(self, chunk: np.ndarray) -> bytes:
        return self._pack(self._resample(chunk, last=False))

    def flush(self) -> bytes:
        """The resampler's tail (and the header, for a reply with no audio at all)."""
        return self._pack(self._resample(np.zeros(0, dtype=np.float32), last=True))

    def _resample(self, chunk: np.ndarray, last: bool) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        return chunk if self._resampler is None else self._resampler.resample_chunk(chunk, last=last)

    def _pack(self, wave: np.ndarray) -> bytes:
        encode = {ReplyFormat.MULAW_8K: encode_mulaw, ReplyFormat.ALAW_8K: encode_alaw}.get(self.format, pcm16_bytes)
        body = encode(wave)
        if self._header_sent:
            return body
        self._header_sent = True
        return _streaming_wav_header(self.format.sample_rate) + body


def _streaming_wav_header(rate: int) -> bytes:
    unknown = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", unknown)
    )
