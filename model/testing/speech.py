"""Caller and voice audio for demos, tests and benchmarks: real speech from espeak-ng, or a synthetic stand-in."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from model.processing.audio import load_audio_file, resample


def speak(text: str) -> tuple[np.ndarray, int]:
    """Real speech audio, synthesised by espeak-ng: (mono float32 wave, sample rate)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); pass recorded audio instead")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([espeak, "-w", str(wav), text], check=True, capture_output=True)
        return load_audio_file(wav)


def speak_at(text: str, rate: int) -> np.ndarray:
    """espeak-ng speech (see `speak`) resampled to `rate`."""
    audio, source_rate = speak(text)
    return resample(audio, source_rate, rate)


def synthetic_speech(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-shaped signal (harmonics under a 4 Hz envelope) for tests and benchmarks that need
    speech-like audio where espeak-ng is absent."""
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(seed)
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
