"""Turn detection (silero-vad's ONNX model, shipped in its wheel) on real speech from espeak-ng, with silence and noise."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cluster.calls.vad import SpeechStarted, SpeechStopped, TurnDetection, TurnDetector
from model.processing.audio import REASONER_RATE
from model.testing.speech import speak_at

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

RATE = REASONER_RATE


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def noisy(audio: np.ndarray, level: float = 0.003, seed: int = 0) -> np.ndarray:
    return audio + (level * np.random.default_rng(seed).standard_normal(audio.size)).astype(np.float32)


def voiced(audio: np.ndarray) -> tuple[int, int]:
    """First and last sample of an espeak-ng clip that is not its own lead-in or trailing quiet."""
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return int(loud[0]), int(loud[-1])


def run(audio: np.ndarray, chunk: int = 320, **settings) -> list:
    """Feed 20 ms chunks, as a phone line delivers them."""
    detector = TurnDetector(TurnDetection(**settings))
    return [event for i in range(0, audio.size, chunk) for event in detector.feed(audio[i:i + chunk])]


def test_one_commit_per_utterance_and_none_inside_a_word():
    utterances = [speak_at(t, RATE) for t in ("Hello there, I would like to book a table for two people tomorrow evening.",
                                    "Yes.", "Could you also tell me whether you have a table by the window?")]
    burst = (0.02 * np.random.default_rng(1).standard_normal(RATE)).astype(np.float32)  # a second of hiss
    parts, spans, at = [silence(1.0)], [], RATE
    for n, utterance in enumerate(utterances):
        first, last = voiced(utterance)
        spans.append((at + first, at + last))
        parts += [utterance, silence(1.2)] + ([burst, silence(0.8)] if n == 0 else [])
        at += utterance.size + int(1.2 * RATE) + (burst.size + int(0.8 * RATE) if n == 0 else 0)
    events = run(noisy(np.concatenate(parts)))
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(stops) == len(utterances) == len(starts)  # the hiss and the commas inside a sentence commit nothing
    for stop, start, (begin, end) in zip(stops, starts, spans):
        # The committed audio holds the whole utterance: from the prefix padding before it to its end.
        assert start.audio_start_ms <= 1000 * begin / RATE
        assert 1000 * begin / RATE - start.audio_start_ms <= 300 + 100
        assert 1000 * end / RATE - 100 <= stop.audio_end_ms <= 1000 * end / RATE + 250
        assert abs(stop.audio.size - (stop.audio_end_ms - start.audio_start_ms) * RATE / 1000) <= RATE // 100


def test_silence_and_noise_alone_are_not_speech():
    assert run(noisy(silence(3.0), level=0.01)) == []


def test_a_short_silence_window_splits_where_the_default_does_not():
    # espeak-ng pauses about 0.4 s at the comma: inside the default 500 ms window, outside a 200 ms one.
    audio = noisy(np.concatenate([silence(0.5), speak_at("One moment, please let me check that for you.", RATE), silence(1.5)]))
    assert sum(isinstance(e, SpeechStopped) for e in run(audio)) == 1
    assert sum(isinstance(e, SpeechStopped) for e in run(audio, silence_duration_ms=200)) == 2
