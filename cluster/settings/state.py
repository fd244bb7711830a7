"""Where the cluster's state lives (Redis)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from model.errors import InternalError


class StateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_url_env: str | None = Field(None, description="an env var holding the URL (with its password); wins over redis_url")
    session_ttl_s: int = Field(3600, ge=1)
    key_prefix: str = "chroma"
    connection_retries: int = Field(3, ge=0, description="per command, on a dropped connection (Redis restarted)")
    require_fsync: bool = Field(
        True, description="acknowledge voices and turns only if Redis fsyncs every write (appendonly yes, appendfsync "
        "always; checked with CONFIG GET). false: trust the server as it is (e.g. where CONFIG is disabled)",
    )

    def url(self) -> str:
        if self.redis_url_env:
            url = os.environ.get(self.redis_url_env)
            if not url:
                raise InternalError(f"state.redis_url_env names {self.redis_url_env}, which is not set")
            return url
        return self.redis_url
