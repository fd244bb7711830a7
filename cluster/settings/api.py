"""The HTTP API's limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(10 * 2**20, ge=1, description="request body limit (413 past it)")
    max_audio_seconds: float = Field(60.0, gt=0, description="caller audio per turn")
    max_voice_audio_seconds: float = Field(30.0, gt=0, description="reference audio of a voice")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 503 answers")
