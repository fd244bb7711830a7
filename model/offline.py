"""Offline Chroma: one process, one turn at a time, the whole model loaded from a checkpoint directory."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .audio import load_audio_file
from .checkpoint import Checkpoint, load_codec, load_speech, load_thinker, resolve_dtype
from .generate import TurnResult, VoicePrompt, encode_voice, generate_turn
from .processor import ChromaProcessor, Conversation
from .sampling import SamplingParams
from .tiny import RANDOM_WEIGHTS_NOTICE


def uses_random_weights(path: str | Path) -> bool:
    return (Path(path) / "RANDOM_WEIGHTS.txt").is_file()


class OfflineChroma:
    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu"):
        self.path = Path(path)
        self.random_weights = uses_random_weights(self.path)
        checkpoint = Checkpoint(self.path)
        self.config = checkpoint.config
        torch_dtype = resolve_dtype(dtype)
        self.thinker = load_thinker(checkpoint, torch_dtype, device)
        self.speech = load_speech(checkpoint, torch_dtype, device)
        self.codec = load_codec(checkpoint, torch_dtype, device)
        self.processor = ChromaProcessor.from_pretrained(self.path)

    def voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePrompt:
        prompt = self.processor.encode_voice_prompt(transcript, audio, sample_rate)
        return encode_voice(
            self.codec, self.config, torch.as_tensor(prompt.text_ids)[0], torch.as_tensor(prompt.input_values),
            num_samples=prompt.num_samples,
        )

    def reply(
        self, conversation: Conversation, voice: VoicePrompt, max_frames: int = 250, sampling: SamplingParams | None = None
    ) -> TurnResult:
        inputs = self.processor.encode_conversation(conversation)
        return generate_turn(
            self.thinker, self.speech, self.codec, inputs, voice, max_frames=max_frames, sampling=sampling,
            decode_text=self.processor.decode_text,
        )


def speak(text: str) -> tuple[np.ndarray, int]:
    """Real speech audio for demos and tests, synthesised by espeak-ng."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); pass recorded audio instead")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([espeak, "-w", str(wav), text], check=True, capture_output=True)
        return load_audio_file(wav)


__all__ = ["OfflineChroma", "RANDOM_WEIGHTS_NOTICE", "speak", "uses_random_weights"]
