"""Server-side voice activity detection and turn detection for live calls.

`SileroVad` runs silero-vad's ONNX model (shipped inside the `silero-vad` wheel) with onnxruntime on the CPU:
one inference session per process, shared by every call; each call keeps its own recurrent state
(`VadStream`). The model scores 32 ms windows of 16 kHz audio (512 samples, after 64 samples of context).

`TurnDetector` turns those scores into the events of OpenAI's `server_vad`: speech started (the audio start
includes `prefix_padding_ms` of what came before), a silence window that may still end in more speech, and
speech stopped once the silence has lasted `silence_duration_ms`; it then hands over the utterance's audio.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal
from importlib import resources

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.processing.audio import REASONER_RATE

WINDOW = 512  # samples per scored window at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees before each window
WINDOW_MS = 1000 * WINDOW // REASONER_RATE
# silero's own recipe: leave speech only when the probability falls this far below the threshold.
HYSTERESIS = 0.15


# semantic_vad's eagerness as the silence that ends the caller's turn: OpenAI's end-of-turn model waits longer for
# `low` and less for `high`; until one runs here, the silence window stands in for it.
EAGERNESS_SILENCE_MS = {"low": 1000, "medium": 500, "auto": 500, "high": 250}


class TurnDetection(BaseModel):
    """OpenAI Realtime's `server_vad` settings, plus `early_start` (ours). `semantic_vad` maps onto them:
    `eagerness` picks the silence window (`EAGERNESS_SILENCE_MS`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    eagerness: Literal["low", "medium", "high", "auto"] | None = None  # semantic_vad's
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="speech probability that starts speech")
    prefix_padding_ms: int = Field(300, ge=0, le=5000, description="audio kept from before speech started")
    silence_duration_ms: int = Field(500, ge=32, le=10000, description="silence that ends the caller's turn")
    create_response: bool = Field(True, description="answer as soon as the caller's turn ends")
    interrupt_response: bool = Field(True, description="caller speech during a reply cancels it (barge-in)")
    idle_timeout_ms: int | None = Field(None, ge=1000, description="silence after a reply before a timeout event")
    early_start: bool = Field(False, description="start the reply in the silence window; drop it if speech resumes")

    @model_validator(mode="after")
    def _semantic(self) -> TurnDetection:
        if self.type == "semantic_vad":
            self.eagerness = self.eagerness or "auto"
            self.silence_duration_ms = EAGERNESS_SILENCE_MS[self.eagerness]
        elif self.eagerness is not None:
            raise ValueError("eagerness is a semantic_vad setting")
        return self


class SileroVad:
    """The shared model. `stream()` gives one call's detector state."""

    _shared: SileroVad | None = None
    _lock = threading.Lock()

    def __init__(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        model = resources.files("silero_vad.data").joinpath("silero_vad.onnx")
        with resources.as_file(model) as path:
            self.session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self._rate = np.array(REASONER_RATE, dtype=np.int64)

    @classmethod
    def shared(cls) -> SileroVad:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def stream(self) -> VadStream:
        return VadStream(self)

    def score(self, windows: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """windows [B, CONTEXT + WINDOW] float32, state [2, B, 128] -> (probabilities [B], new state)."""
        probability, state = self.session.run(None, {"input": windows, "state": state, "sr": self._rate})
        return probability[:, 0], state


class VadStream:
    """One call's VAD state: the model's recurrent state and the last CONTEXT samples."""

    def __init__(self, vad: SileroVad):
        self.vad = vad
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)

    def score(self, window: np.ndarray) -> float:
        """window [WINDOW] float32 at 16 kHz -> speech probability."""
        framed = np.concatenate([self.context, window])[None]
        probability, self.state = self.vad.score(framed, self.state)
        self.context = window[-CONTEXT:]
        return float(probability[0])


@dataclass
class SpeechStarted:
    audio_start_ms: int  # includes the prefix padding


@dataclass
class SilenceStarted:
    """The caller paused: the utterance so far, in case the pause turns out to end the turn (early start)."""

    audio_end_ms: int
    audio: np.ndarray


@dataclass
class SpeechResumed:
    """The pause was not the end of the turn."""


@dataclass
class SpeechStopped:
    audio_end_ms: int
    audio: np.ndarray  # 16 kHz float32: from audio_start_ms to audio_end_ms


TurnEvent = SpeechStarted | SilenceStarted | SpeechResumed | SpeechStopped


class TurnDetector:
    """Feeds a call's 16 kHz audio through the VAD and yields turn events. Times are ms since the call's first
    audio. Not thread-safe: one call's audio, in order."""

    MIN_SPEECH_WINDOWS = 2  # a single loud window (a click) is not speech

    def __init__(self, settings: TurnDetection, vad: SileroVad | None = None):
        self.settings = settings
        self.vad = (vad or SileroVad.shared()).stream()
        self.pending = np.zeros(0, dtype=np.float32)  # not yet scored (less than a window)
        self.history = np.zeros(0, dtype=np.float32)  # scored audio kept for padding and the utterance
        self.history_start = 0  # sample index of history[0] since the call began
        self.samples = 0  # samples scored since the call began
        self.speaking = False
        self.voiced_run = 0  # consecutive windows over the threshold while not speaking
        self.speech_start = 0  # sample index where the utterance (with its padding) starts
        self.silence_start: int | None = None  # sample index where the current pause began

    def reset(self) -> None:
        """Drop the buffered audio and any utterance in progress (input_audio_buffer.clear)."""
        self.history = np.zeros(0, dtype=np.float32)
        self.history_start = self.samples
        self.speaking, self.voiced_run, self.silence_start = False, 0, None

    def feed(self, audio: np.ndarray) -> list[TurnEvent]:
        """audio: 16 kHz float32 of any length. Returns the events it caused, in order."""
        self.pending = np.concatenate([self.pending, audio.astype(np.float32, copy=False)])
        events: list[TurnEvent] = []
        while self.pending.size >= WINDOW:
            window, self.pending = self.pending[:WINDOW], self.pending[WINDOW:]
            events += self._step(window, self.vad.score(window))
        return events

    def buffered_audio(self) -> np.ndarray:
        """Everything since the utterance started (or since the last commit / clear), for a manual commit."""
        start = self.speech_start if self.speaking else self.history_start
        return self.history[max(0, start - self.history_start):]

    def commit(self) -> None:
        """The buffered audio was taken as the caller's turn (a manual commit)."""
        self.reset()

    def _step(self, window: np.ndarray, probability: float) -> list[TurnEvent]:
        self.history = np.concatenate([self.history, window])
        start_of_window = self.samples
        self.samples += WINDOW
        threshold = self.settings.threshold
        if not self.speaking:
            self.voiced_run = self.voiced_run + 1 if probability >= threshold else 0
            if self.voiced_run < self.MIN_SPEECH_WINDOWS:
                self._trim_history(start_of_window)
                return []
            padding = self.settings.prefix_padding_ms * REASONER_RATE // 1000
            first_voiced = start_of_window - (self.MIN_SPEECH_WINDOWS - 1) * WINDOW
            self.speech_start = max(self.history_start, first_voiced - padding)
            self.speaking, self.silence_start = True, None
            return [SpeechStarted(self._ms(self.speech_start))]
        if probability >= threshold - HYSTERESIS:
            if self.silence_start is None:
                return []
            self.silence_start = None
            return [SpeechResumed()]
        events: list[TurnEvent] = []
        if self.silence_start is None:
            self.silence_start = start_of_window
            events.append(SilenceStarted(self._ms(start_of_window), self._utterance(start_of_window)))
        if self.samples - self.silence_start >= self.settings.silence_duration_ms * REASONER_RATE // 1000:
            end = self.silence_start
            events.append(SpeechStopped(self._ms(end), self._utterance(end)))
            self.speaking, self.voiced_run, self.silence_start = False, 0, None
            self.history = self.history[end - self.history_start:]
            self.history_start = end
        return events

    def _utterance(self, end: int) -> np.ndarray:
        return self.history[self.speech_start - self.history_start: end - self.history_start].copy()

    def _trim_history(self, now: int) -> None:
        """Outside speech only the prefix padding (and the voiced run) can still be needed."""
        keep = self.settings.prefix_padding_ms * REASONER_RATE // 1000 + self.MIN_SPEECH_WINDOWS * WINDOW
        drop = self.history.size - keep
        if drop > 0:
            self.history = self.history[drop:]
            self.history_start += drop

    @staticmethod
    def _ms(sample: int) -> int:
        return sample * 1000 // REASONER_RATE
