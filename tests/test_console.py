"""The /console page as the app serves it: one static page that fetches nothing from anywhere but this app (the
browser test, tests/live_cluster/test_console.py, holds a call through it)."""

from __future__ import annotations

import re
import uuid

import httpx
import redis.asyncio

from cluster.api.app import build_api
from cluster.settings.state import StateSettings
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory
from tests.test_calls import KEYS, SilentBackend


async def test_the_console_is_one_page_that_needs_nothing_from_elsewhere(redis_port):
    store = StateStore(redis.asyncio.Redis(port=redis_port), StateSettings(key_prefix=f"p{uuid.uuid4().hex[:8]}"))
    app = build_api(store, TenantDirectory(KEYS), SilentBackend())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as client:
        page = await client.get("/console")  # no key: the page holds none, and asks for one
        spec = (await client.get("/openapi.json")).json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy  # the browser enforces it too
    assert re.findall(r"\b[a-z]+://\w", page.text) == []  # no absolute URL
    assert set(re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page.text)) <= {"data:,"}
    assert "sessionStorage" in page.text and "localStorage" not in page.text
    assert "openai-insecure-api-key." in page.text and "Authorization: `Bearer" in page.text
    assert "/console" not in spec["paths"]  # a page, not part of the API
