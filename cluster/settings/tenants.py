"""Tenants' keys and quotas: how many turns and calls each may have live at once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# What admission control admits: one turn over HTTP, a live call, or one reply of a live call while it is generated.
Kind = Literal["turn", "call", "reply"]


class TenantQuota(BaseModel):
    """Live work one tenant may hold at once (None: only the cluster's capacity bounds it). Past it: 429."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int | None = Field(None, ge=0, description="concurrent turns (POST .../turns)")
    max_calls: int | None = Field(None, ge=0, description="concurrent live calls")

    def limit(self, kind: Kind) -> int | None:
        """A call's replies count against its call, not against the tenant's turns."""
        return {"turn": self.max_turns, "call": self.max_calls, "reply": None}[kind]


class TenantSettings(BaseSettings):
    """Without a value, $CHROMA_API_KEYS (how the Helm chart hands the keys over)."""

    model_config = SettingsConfigDict(env_prefix="CHROMA_", extra="forbid")

    api_keys: str = Field("", description='JSON {"api-key": "tenant"}, or the path of a file holding that JSON')
    default_quota: TenantQuota = Field(default_factory=TenantQuota, description="for tenants not in `quotas`")
    quotas: dict[str, TenantQuota] = Field(default_factory=dict, description="per tenant name")
