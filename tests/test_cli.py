"""The offline main job: `chroma-serve generate` answers a spoken turn and writes the reply WAV."""

import re
import shutil
import subprocess
import sys

import pytest
import soundfile

from model.processing.audio import write_wav
from tests.conftest import speech_like


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_writes_a_wav_of_frames_times_frame_size(tiny_checkpoint, tmp_path):
    write_wav(tmp_path / "caller.wav", speech_like(8000, 1.2, seed=4), 8000)
    write_wav(tmp_path / "voice.wav", speech_like(44100, 2.0, seed=5), 44100)
    out = tmp_path / "out" / "reply.wav"
    done = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--audio", str(tmp_path / "caller.wav"),
                   "--voice-audio", str(tmp_path / "voice.wav"), "--voice-text", "A sample of my voice.",
                   "--max-frames", "20", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "RANDOM WEIGHTS" in done.stderr
    frames = int(re.search(r"frames:\s+(\d+)", done.stdout).group(1))
    assert 1 <= frames <= 20
    assert re.search(r"real-time factor: \d+\.\d+", done.stdout)
    info = soundfile.info(out)
    assert info.samplerate == 24000 and info.channels == 1
    assert info.frames == frames * 1920


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_generate_with_real_speech_from_espeak(tiny_checkpoint, tmp_path):
    out = tmp_path / "reply.wav"
    done = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--max-frames", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert soundfile.info(out).frames == int(re.search(r"frames:\s+(\d+)", done.stdout).group(1)) * 1920


def test_generate_reports_bad_audio_clearly(tiny_checkpoint, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    done = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--audio", str(tmp_path / "bad.wav"),
                   "--out", str(tmp_path / "r.wav"))
    assert done.returncode == 2
    assert "error" in done.stderr and "Traceback" not in done.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    done = run_cli("generate", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "r.wav"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr
