"""Settings of live calls: the call engine's limits, and the telephony protocols' pacing."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CallSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_message_bytes: int = Field(1 << 20, ge=1024, description="largest client message")
    idle_timeout_s: float = Field(60.0, gt=0, description="a call with no client message for this long is closed")
    max_call_s: float = Field(3600.0, gt=0, description="longest call")
    max_utterance_s: float = Field(60.0, gt=0, description="longest caller turn (the input buffer)")
    early_start: bool = Field(False, description="default of turn_detection.early_start")


class TelephonySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_lead_ms: int = Field(400, ge=40, description="unplayed reply audio queued at the carrier, at most")
    chunk_ms: int = Field(100, ge=20, multiple_of=20, description="reply audio per media message")
    max_payload_ms: int = Field(1000, ge=20, description="caller audio per media message, at most")
