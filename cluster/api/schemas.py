"""Request and response bodies of the HTTP API, as pydantic models (they are the OpenAPI document's schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.state.history import Truncation
from cluster.state.store import Session, SessionSampling, Voice
from model.processing.audio import ReplyFormat


class VoiceOut(BaseModel):
    """A cloned voice (its Mimi codes stay in the store)."""

    id: str
    tenant: str
    name: str
    transcript: str
    num_frames: int = Field(description="reference audio frames (12.5 per second)")
    num_codebooks: int
    valid_frames: int
    created_at: datetime

    @classmethod
    def of(cls, voice: Voice) -> VoiceOut:
        return cls.model_validate(voice.model_dump(exclude={"transcript_ids"}))


class VoiceList(BaseModel):
    voices: list[VoiceOut]


class VoiceForm(BaseModel):
    """multipart/form-data fields of `POST /v1/voices`."""

    audio: bytes = Field(description="reference clip: WAV, FLAC or OGG, mono, up to 30 s",
                         json_schema_extra={"format": "binary"})
    transcript: str = Field(description="what the clip says", min_length=1)
    name: str = "voice"


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    voice_id: str
    system_prompt: str = ""
    output_format: ReplyFormat = ReplyFormat.PCM16_24K
    sampling: SessionSampling = Field(default_factory=SessionSampling)
    truncation: Truncation | None = Field(None, description="default: the server's (history.truncation, \"auto\")")


class SessionUpdate(BaseModel):
    """`PATCH /v1/sessions/{id}`: the settings to change (the history stays)."""

    model_config = ConfigDict(extra="forbid")

    voice_id: str | None = None
    system_prompt: str | None = None
    truncation: Truncation | None = None


SessionOut = Session


class TurnDoneEvent(BaseModel):
    """The `done` event that ends a turn streamed as server-sent events."""

    turn_id: str
    frames: int
    text: str
    ttfa_ms: float | None = Field(description="request received to first reply audio sent")
    rtf: float | None = Field(description="turn wall time / reply audio duration")
    audio_seconds: float
    session_version: int
    timings: dict[str, float]
    prompt_tokens: int | None = Field(None, description="the Reasoner's prompt positions")
    cached_tokens: int | None = Field(None, description="of them, served by its prefix cache (not computed again)")
    new_tokens: int | None = Field(None, description="what the prompt adds to the last turn's: its reply and the new "
                                   "message, template tokens included (null: the first turn, or one truncated now)")
    shipped_bytes: dict[str, int] = Field(default_factory=dict, description="the turn's request, as each stage got it")
    dropped: list[str] = Field(default_factory=list, description="history item ids this turn's truncation removed, or took the caller audio of")


class Health(BaseModel):
    status: Literal["ok"]


class StageReport(BaseModel):
    name: str
    replicas: int = Field(description="live replicas")
    capacity: int | None = Field(description="turns and calls it holds at once across them (null: no bound)")
    step_ms_by_batch: dict[int, float] = Field(
        default_factory=dict, description="one replica's expected ms per batched step, by batch size: calibrated at "
        "start, learned from its steps since (the curve its capacity is read from)",
    )


class Ready(BaseModel):
    status: Literal["ready"]
    capacity: int | None = Field(
        description="reply places: turns and live calls' replies generated at once, its smallest stage's")
    call_budget: int | None = Field(description="live calls held at once: the reply places, oversubscribed")
    reply_share: float | None = Field(
        description="of the ended calls' time (this Ingress), the share their replies held a reply place")
    stages: list[StageReport]
