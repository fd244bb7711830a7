"""Abuse of the audio parsers and the request parsers (hypothesis, a bounded number of examples each): lying WAV
sizes, 64 channels, zero or huge rates, corrupt FLAC and OGG, truncated mu-law and PCM, odd content types. Errors
only (AudioError and the API's typed 4xx errors), never a crash, another exception or a hang; every message
names the problem and carries nothing internal."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.api.errors import http_status
from cluster.api.media import caller_encoding, media_type, negotiate_reply
from model.errors import CallerError
from model.processing.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, AudioError, decode_audio, encode_wav

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
INTERNALS = ("Traceback", 'File "', "/work", "site-packages", "0x7f")


def check_decoded(data: bytes, **kwargs) -> None:
    """decode_audio either refuses the bytes with an AudioError or returns sane mono audio."""
    try:
        wave, rate = decode_audio(data, **kwargs)
    except AudioError as error:
        assert error.message and not any(s in error.message for s in INTERNALS), error.message
        return
    assert wave.ndim == 1 and wave.size > 0 and wave.dtype == np.float32
    assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0
    assert MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE


def wav_header(channels: int, rate: int, bits: int, riff_size: int, fmt_size: int, data_size: int) -> bytes:
    block = max(channels * bits // 8, 0) & 0xFFFF
    fmt = struct.pack("<HHIIHH", 1, channels & 0xFFFF, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block, bits)
    return (b"RIFF" + struct.pack("<I", riff_size & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", fmt_size)
            + fmt + b"data" + struct.pack("<I", data_size & 0xFFFFFFFF))


sizes = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.sampled_from([0, 0xFFFFFFFF, 0x7FFFFFFF]))


@FUZZ
@given(channels=st.one_of(st.sampled_from([0, 1, 2, 64, 65535]), st.integers(0, 70)),
       rate=st.one_of(st.sampled_from([0, 1, 7999, 8000, 16000, 192001, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)),
       bits=st.sampled_from([0, 8, 16, 24, 32, 7, 64]), riff_size=sizes, data_size=sizes,
       fmt_size=st.sampled_from([16, 18, 40, 0, 2**31]), body=st.binary(max_size=4096))
def test_wav_headers_that_lie(channels, rate, bits, riff_size, data_size, fmt_size, body):
    check_decoded(wav_header(channels, rate, bits, riff_size, fmt_size, data_size) + body)


def encoded(fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    audio = np.sin(np.linspace(0, 200, 8000)).astype(np.float32) * 0.5
    sf.write(buffer, audio, 16000, format=fmt, subtype=subtype)
    return buffer.getvalue()


CONTAINERS = [encode_wav(np.zeros(4000, np.float32), 16000), encoded("FLAC"), encoded("OGG", "VORBIS")]


@FUZZ
@given(which=st.integers(0, len(CONTAINERS) - 1), cut=st.integers(0, 20000),
       flips=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), max_size=8))
def test_truncated_and_corrupted_containers(which, cut, flips):
    data = bytearray(CONTAINERS[which][:cut])
    for position, value in flips:
        if position < len(data):
            data[position] = value
    check_decoded(bytes(data))


@FUZZ
@given(data=st.binary(max_size=3001), encoding=st.sampled_from(["pcm16", "mulaw", None, "opus"]),
       rate=st.one_of(st.none(), st.integers(-2**31, 2**31), st.sampled_from([0, 8000, 16000, 192000])))
def test_raw_audio_of_any_length_and_rate(data, encoding, rate):
    check_decoded(data, sample_rate=rate, encoding=encoding)


@FUZZ
@given(header=st.one_of(st.none(), st.text(max_size=80),
                        st.builds(lambda kind, rate: f"{kind};rate={rate}",
                                  st.sampled_from(["audio/pcm", "audio/basic", "audio/wav", "audio/x-pcm"]),
                                  st.text(max_size=12))))
def test_content_types_of_any_shape(header):
    media_type(header)
    try:
        caller_encoding(header)
    except CallerError as error:
        assert 400 <= http_status(error) < 500 and error.message


class Session:
    output_format = "pcm16_24k"


@FUZZ
@given(accept=st.one_of(st.none(), st.text(max_size=120)))
def test_accept_headers_of_any_shape(accept):
    try:
        negotiate_reply(accept, Session())
    except CallerError as error:
        assert http_status(error) == 406
