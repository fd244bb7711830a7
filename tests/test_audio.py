import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from model.processing.audio import (
    AudioError,
    ReplyFormat,
    StreamingAudioEncoder,
    decode_audio,
    encode_mulaw,
    encode_wav,
    load_audio_file,
    resample,
    write_wav,
)
from model.testing.speech import synthetic_speech


def sine(rate: int, seconds: float = 0.25, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def container(wave: np.ndarray, rate: int, fmt: str, subtype: str | None = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100])
def test_container_round_trip(fmt: str, rate: int) -> None:
    wave = sine(rate)
    out, out_rate = decode_audio(container(wave, rate, fmt))
    assert out_rate == rate
    assert out.dtype == np.float32 and out.shape == wave.shape
    np.testing.assert_allclose(out, wave, atol=1e-4)


def test_ogg_is_read() -> None:
    wave = sine(16000, seconds=0.5)
    out, rate = decode_audio(container(wave, 16000, "OGG", subtype="VORBIS"))
    assert rate == 16000
    assert abs(len(out) - len(wave)) < 100
    assert np.abs(out).max() > 0.3


def test_encode_wav_and_files(tmp_path) -> None:
    wave = sine(24000)
    out, rate = decode_audio(encode_wav(wave, 24000))
    assert rate == 24000
    np.testing.assert_allclose(out, wave, atol=1e-4)
    path = tmp_path / "a.wav"
    write_wav(path, wave, 24000)
    out, rate = load_audio_file(path)
    assert rate == 24000
    np.testing.assert_allclose(out, wave, atol=1e-4)


def test_raw_pcm16() -> None:
    pcm = np.array([0, 16384, -16384, 32767, -32768], dtype="<i2")
    out, rate = decode_audio(pcm.tobytes(), encoding="pcm16", sample_rate=16000)
    assert rate == 16000
    np.testing.assert_allclose(out, pcm / 32768.0)


def test_mulaw_round_trip() -> None:
    wave = sine(8000, seconds=0.5, amp=0.8)
    data = encode_mulaw(wave)
    assert len(data) == len(wave)
    out, rate = decode_audio(data, encoding="mulaw")
    assert rate == 8000
    assert np.abs(out - wave).max() < 0.02  # 8-bit log quantisation, coarsest step 1024/32768
    snr = 10 * np.log10(np.sum(wave**2) / np.sum((out - wave) ** 2))
    assert snr > 30


def test_mulaw_reference_values() -> None:
    # G.711: 0xFF and 0x7F are (+/-) zero, 0x80 / 0x00 are the positive / negative extremes.
    out, _ = decode_audio(bytes([0xFF, 0x7F, 0x80, 0x00]), encoding="mulaw", sample_rate=16000)
    np.testing.assert_array_equal(out * 32768, [0, 0, 32124, -32124])
    assert encode_mulaw(np.array([0.0, 1.0, -1.0], dtype=np.float32)) == bytes([0xFF, 0x80, 0x00])


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (b"", {}, "empty"),
        (b"this is not audio at all, just text", {}, "unknown audio format"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", {}, "WAV audio is truncated or corrupt"),
        (b"fLaC" + b"\x00" * 40, {}, "could not read FLAC"),
        (b"\x00\x01\x02", {"encoding": "pcm16", "sample_rate": 16000}, "odd byte count"),
        (b"\x00\x01", {"encoding": "pcm16"}, "needs sample_rate"),
        (b"\x00\x01", {"encoding": "pcm16", "sample_rate": 4000}, "unsupported sample rate 4000"),
        (b"\x00\x01", {"encoding": "mulaw", "sample_rate": 400000}, "unsupported sample rate 400000"),
        (b"\x00\x01", {"encoding": "mp3"}, "unknown audio encoding 'mp3'"),
    ],
)
def test_bad_bytes(data: bytes, kwargs: dict, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        decode_audio(data, **kwargs)


def test_truncated_wav() -> None:
    data = container(sine(16000), 16000, "WAV")
    with pytest.raises(AudioError, match="truncated"):
        decode_audio(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated or corrupt"):
        decode_audio(data[:30])


def test_stereo_rejected() -> None:
    stereo = np.stack([sine(16000), sine(16000)], axis=1)
    with pytest.raises(AudioError, match="has 2 channels; send mono audio"):
        decode_audio(container(stereo, 16000, "WAV"))


def test_zero_samples_rejected() -> None:
    with pytest.raises(AudioError, match="zero samples"):
        decode_audio(container(np.zeros(0, dtype=np.float32), 16000, "WAV"))


def test_non_finite_rejected() -> None:
    wave = sine(16000)
    wave[10] = np.nan
    with pytest.raises(AudioError, match="NaN or infinite"):
        decode_audio(container(wave, 16000, "WAV", subtype="FLOAT"))


def test_unsupported_container_rate() -> None:
    with pytest.raises(AudioError, match="unsupported sample rate 4000"):
        decode_audio(container(sine(4000), 4000, "WAV"))


def test_declared_rate_must_match_header() -> None:
    with pytest.raises(AudioError, match="header says 16000 Hz"):
        decode_audio(container(sine(16000), 16000, "WAV"), sample_rate=8000)


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="not found: .*nope.wav"):
        load_audio_file(path)


@pytest.mark.parametrize(("src", "dst"), [(16000, 24000), (44100, 16000), (8000, 16000)])
def test_resample_length(src: int, dst: int) -> None:
    wave = sine(src, seconds=1.0)
    out = resample(wave, src, dst)
    assert out.dtype == np.float32
    assert abs(len(out) - dst) <= 1


def test_resample_identity_and_errors() -> None:
    wave = sine(16000)
    np.testing.assert_array_equal(resample(wave, 16000, 16000), wave)
    with pytest.raises(AudioError, match="mono"):
        resample(np.zeros((10, 2), dtype=np.float32), 16000, 8000)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_real_speech(tmp_path) -> None:
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello, how are you today"], check=True)
    wave, rate = load_audio_file(path)
    assert wave.ndim == 1 and len(wave) > rate // 2
    assert np.abs(wave).max() > 0.05
    assert len(resample(wave, rate, 16000)) == pytest.approx(len(wave) * 16000 / rate, abs=2)


# ---- streamed reply formats ------------------------------------------------------------------------------

def stream_encode(reply_format, wave, chunk):
    encoder = StreamingAudioEncoder(reply_format, 24000)
    parts = [encoder.encode(wave[i:i + chunk]) for i in range(0, len(wave), chunk)]
    return b"".join(parts) + encoder.flush()


@pytest.mark.parametrize("reply_format", list(ReplyFormat))
def test_streamed_reply_bytes_equal_the_whole_reply(reply_format):
    wave = 0.5 * synthetic_speech(24000, 1.0, seed=3)
    whole = stream_encode(reply_format, wave, len(wave))
    chunked = stream_encode(reply_format, wave, 3840)  # 160 ms chunks, as the codec streams them
    assert chunked == whole


def test_reply_formats_decode_back_at_their_rates():
    wave = 0.5 * synthetic_speech(24000, 1.0, seed=4)
    pcm = stream_encode(ReplyFormat.PCM16_16K, wave, 1920)
    back, rate = decode_audio(pcm, encoding="pcm16", sample_rate=16000)
    assert rate == 16000 and abs(len(back) - 16000) <= 2
    mulaw = stream_encode(ReplyFormat.MULAW_8K, wave, 1920)
    back, rate = decode_audio(mulaw, encoding="mulaw")
    assert rate == 8000 and abs(len(back) - 8000) <= 2
    reference = resample(wave, 24000, 8000)[: len(back)]
    assert np.corrcoef(back, reference)[0, 1] > 0.99
    wav = stream_encode(ReplyFormat.WAV, wave, 1920)
    back, rate = decode_audio(wav)
    assert rate == 24000 and len(back) == len(wave)
    assert ReplyFormat.MULAW_8K.media_type == "audio/basic"


def test_an_empty_wav_reply_is_still_a_valid_header():
    encoder = StreamingAudioEncoder(ReplyFormat.WAV, 24000)
    data = encoder.flush()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) == 44


def test_call_audio_lines_encode_what_they_name():
    from cluster.calls.audio import InboundAudio, LineFormat, OutboundAudio
    from model.processing.audio import encode_alaw

    wave = 0.4 * synthetic_speech(24000, 0.5, seed=7)
    for line, encoding, encode in ((LineFormat.PCMU, "mulaw", encode_mulaw), (LineFormat.PCMA, "alaw", encode_alaw)):
        out = OutboundAudio(line)
        data = out.encode(wave) + out.flush()
        expected = encode(resample(wave, 24000, 8000))  # one 8 kHz G.711 byte per sample, no header
        assert len(data) == len(expected)
        got, _ = decode_audio(data, encoding=encoding)
        want, _ = decode_audio(expected, encoding=encoding)
        assert np.abs(got - want).max() < 0.05  # the same audio, up to the streaming resampler's filter
        heard = InboundAudio(line).decode(data)  # and back to the Reasoner's 16 kHz, 26 ms held in the filter
        assert wave.size * 2 // 3 - heard.size <= 16000 * 30 // 1000
    pcm = OutboundAudio(LineFormat.PCM16_24K)
    assert pcm.encode(wave) == np.round(np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    with pytest.raises(AudioError, match="16-bit"):
        InboundAudio(LineFormat.PCM16_24K).decode(b"\x00\x01\x02")
