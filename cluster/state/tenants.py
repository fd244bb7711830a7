"""Tenants: which API key names which tenant."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TenantSettings(BaseSettings):
    """Without a value, $CHROMA_API_KEYS (how the Helm chart hands the keys over)."""

    model_config = SettingsConfigDict(env_prefix="CHROMA_", extra="forbid")

    api_keys: str = Field("", description='JSON {"api-key": "tenant"}, or the path of a file holding that JSON')


class TenantDirectory:
    """API key -> tenant. Keys are compared as SHA-256 digests, in constant time, against every entry."""

    def __init__(self, keys: Mapping[str, str]):
        for key, tenant in keys.items():
            if not key or not tenant:
                raise ValueError("API keys and tenant names must be non-empty")
        self._entries = [(_digest(key), tenant) for key, tenant in keys.items()]

    @classmethod
    def from_settings(cls, settings: TenantSettings | None = None) -> TenantDirectory:
        text = (settings or TenantSettings()).api_keys.strip()
        if text and text[0] not in "{[":
            text = Path(text).read_text()
        keys = json.loads(text) if text else {}
        if not isinstance(keys, dict):
            raise ValueError('tenants.api_keys must be a JSON object {"api-key": "tenant"} or a file holding one')
        return cls(keys)

    def tenant_for(self, api_key: str | None) -> str | None:
        if not api_key:
            return None
        digest = _digest(api_key)
        found = None
        for key_digest, tenant in self._entries:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
