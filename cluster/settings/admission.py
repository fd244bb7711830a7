"""How admission control waits for capacity, and how it watches the stages."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AdmissionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttfa_budget_s: float = Field(
        1.0, gt=0, description="time to first audio a turn that waits for capacity must still meet: the only bound "
        "of the line; past it the turn is refused",
    )
    start_timeout_s: float = Field(
        10.0, gt=0, description="an admitted turn whose reply has not started by then is stopped (503 stage_unavailable)",
    )
    stage_poll_s: float = Field(0.5, gt=0, description="how often the stages' readiness and capacity are read")
    probe_timeout_s: float = Field(2.0, gt=0, description="a stage whose probe is not answered within this is not ready")
    lease_s: float = Field(
        15.0, ge=1, description="a ticket's lease in the ledger, renewed every third of it: what an Ingress that dies "
        "holds is free again after this",
    )
    call_oversubscription: float = Field(
        2.0, ge=1, description="live calls admitted per reply place: a call takes a place only while a reply of it "
        "is generated (sized by the measured reply_share in /readyz)",
    )
    reply_queue_s: float = Field(
        1.0, gt=0, description="how long a live call's reply may wait for a reply place when every place is busy; "
        "past it the reply is refused in-band and the call goes on",
    )
