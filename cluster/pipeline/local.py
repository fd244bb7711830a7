"""`LocalTurnBackend`: the API's TurnBackend in one process, no Ray (the tests, benchmarks and the offline demo).

The same stages as the cluster (cluster.pipeline.turn), called directly: Reasoner -> SpeechEngine (its own
engine thread) -> CodecLoop (its own worker thread). The history's caller audio the Reasoner does not hold is
read from `state` (the API's StateStore), as the Reasoner deployment reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from cluster.admission.stages import StageStatus
from cluster.pipeline.history import HistoryPolicy, TurnPlan
from cluster.pipeline.turn import (
    AudioSource,
    ReplyEvent,
    STAGES,
    build_turn_request,
    clone_voice,
    reasoner_pairs,
    reply_events,
    speech_frames,
    surfaced,
    transcript_deltas,
)
from cluster.settings import AppConfig
from cluster.settings.turns import HistorySettings, TurnSettings
from cluster.state.store import Session, Voice
from model.chroma.checkpoint import Checkpoint
from model.chroma.turn import VoicePrompt
from model.engines.codec import CodecEngine, CodecStats
from model.engines.codec_loop import CodecLoop
from model.engines.realtime import Headroom
from model.engines.speech import SpeechEngine, SpeechStats
from model.processing.processor import VoicePromptInputs
from model.reasoner import build_reasoner
from model.reasoner.base import PromptStats, Reasoner


@dataclass(frozen=True)
class LocalStats:
    speech: SpeechStats
    codec: CodecStats


class LocalTurnBackend:
    def __init__(
        self, reasoner: Reasoner, speech: SpeechEngine, codec: CodecLoop, turns: TurnSettings,
        history: HistorySettings | None = None, state: AudioSource | None = None,
    ):
        self.reasoner = reasoner
        self.processor = reasoner.processor
        self.speech = speech
        self.codec = codec
        self.turns = turns
        self.state = state
        self.history = HistoryPolicy(self.processor, reasoner.context, turns.reply_tokens(), reasoner.max_audios,
                                     history or HistorySettings())
        self._closed = False

    @classmethod
    def from_config(
        cls, config: AppConfig, reasoner: Reasoner | None = None, state: AudioSource | None = None
    ) -> LocalTurnBackend:
        """`reasoner`: one already built (a VLLMReasoner takes a minute to start); default: from the config.
        `state`: where the history's caller audio is (the API's StateStore)."""
        model = config.checkpoint
        checkpoint = Checkpoint(model.path)
        if reasoner is None:
            reasoner = build_reasoner(config.reasoner, config.reasoner_path(), model.dtype, model.device)
        speech = SpeechEngine.from_checkpoint(checkpoint, config.speech, model.dtype, model.device)
        codec = CodecLoop(CodecEngine.from_checkpoint(checkpoint, config.codec, model.dtype, model.device))
        return cls(reasoner, speech, codec, config.turns, config.history, state)

    async def stages(self) -> list[StageStatus]:
        if self._closed:
            return [StageStatus.of(name, Headroom(None), problem="closed") for name in STAGES]
        return [
            StageStatus.of("Reasoner", self.reasoner.headroom()),
            StageStatus.of("SpeechStack", self.speech.headroom()),
            StageStatus.of("Codec", self.codec.headroom()),
        ]

    async def clone_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePrompt:
        return await clone_voice(self.processor, self._encode_voice, transcript, audio, sample_rate)

    async def _encode_voice(self, inputs: VoicePromptInputs) -> VoicePrompt:
        return await self.codec.encode_voice(inputs.text_ids[0], inputs.input_values, inputs.num_samples)

    def run_turn(self, turn_id: str, voice: Voice, session: Session, plan: TurnPlan) -> AsyncIterator[ReplyEvent]:
        request = build_turn_request(turn_id, voice, session, plan, self.turns)
        found: list[PromptStats] = []
        pairs = reasoner_pairs(self.reasoner, request.reasoner.prompt, self.state, found.append)
        frames = speech_frames(self.speech, request, pairs, self.codec.engine.chunk_frames)
        return reply_events(self.processor, surfaced(self.codec.decode(turn_id, frames), found))

    def transcribe(self, audio: bytes) -> AsyncIterator[str]:
        return transcript_deltas(self.reasoner, audio, self.turns.transcript_tokens)

    async def close(self) -> None:
        self._closed = True
        await self.speech.close()
        await self.reasoner.close()
        await self.codec.close()

    def stats(self) -> LocalStats:
        return LocalStats(self.speech.stats(), self.codec.stats())
