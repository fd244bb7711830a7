"""Tenants: which API key names which tenant, and how many turns and calls each may have live at once."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path

from cluster.settings.tenants import TenantQuota, TenantSettings


class TenantDirectory:
    """API key -> tenant. Keys are compared as SHA-256 digests, in constant time, against every entry."""

    def __init__(self, keys: Mapping[str, str], quotas: Mapping[str, TenantQuota] | None = None,
                 default_quota: TenantQuota | None = None):
        for key, tenant in keys.items():
            if not key or not tenant:
                raise ValueError("API keys and tenant names must be non-empty")
        self._entries = [(_digest(key), tenant) for key, tenant in keys.items()]
        self._quotas = dict(quotas or {})
        self._default_quota = default_quota or TenantQuota()

    @classmethod
    def from_settings(cls, settings: TenantSettings | None = None) -> TenantDirectory:
        settings = settings or TenantSettings()
        text = settings.api_keys.strip()
        if text and text[0] not in "{[":
            text = Path(text).read_text()
        keys = json.loads(text) if text else {}
        if not isinstance(keys, dict):
            raise ValueError('tenants.api_keys must be a JSON object {"api-key": "tenant"} or a file holding one')
        return cls(keys, settings.quotas, settings.default_quota)

    def quota(self, tenant: str) -> TenantQuota:
        return self._quotas.get(tenant, self._default_quota)

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
