"""The chart's Grafana dashboard queries only what the app exports: every metric and label of every panel is checked
against /metrics of the app built in process (real redis-server, the tiny RANDOM-WEIGHT checkpoint, LocalTurnBackend)
after one turn and one refused request, so every labelled series has samples."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import pytest_asyncio
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families

from cluster.api.app import build_api
from tools.dashboard import DASHBOARD, PANELS, queried_series, render
from cluster.pipeline.local import LocalTurnBackend
from cluster.settings import AppConfig
from cluster.settings.api import ApiSettings
from cluster.settings.state import StateSettings
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory
from model.processing.audio import encode_wav
from model.testing.speech import synthetic_speech

KEY = {"Authorization": "Bearer key-ops"}


def test_the_chart_dashboard_is_the_generated_one():
    assert DASHBOARD.read_text() == render(), "run `make dashboard` after changing PANELS"
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert [p["title"] for p in panels] == [p.title for p in PANELS]
    assert all(t["expr"] for p in panels for t in p["targets"])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def exported(redis_port, tiny_checkpoint) -> dict[str, set[str]]:
    """Sample name -> label names, from /metrics after a turn and a refusal."""
    client = redis.asyncio.Redis(port=redis_port)
    backend = LocalTurnBackend.from_config(AppConfig(
        checkpoint={"path": str(tiny_checkpoint)}, reasoner={"engine": "hf"}, speech={"max_slots": 1, "max_queue": 1},
        codec={"max_streams": 2}, turns={"max_frames": 6, "max_tokens": 8},
    ))
    store = StateStore(client, StateSettings(key_prefix=f"d{uuid.uuid4().hex[:8]}"))
    app = build_api(store, TenantDirectory({"key-ops": "ops"}), backend, ApiSettings())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as http:
            assert (await http.get("/v1/voices")).status_code == 401  # a refusal: chroma_errors{kind}
            voice = await http.post("/v1/voices", headers=KEY, data={"transcript": "Hello there.", "name": "Ops"},
                                    files={"audio": ("v.wav", encode_wav(synthetic_speech(24000, 1.0, seed=3), 24000), "audio/wav")})
            assert voice.status_code == 201, voice.text
            session = await http.post("/v1/sessions", headers=KEY, json={"voice_id": voice.json()["id"]})
            turn = await http.post(f"/v1/sessions/{session.json()['id']}/turns", headers=KEY,
                                   content=encode_wav(synthetic_speech(16000, 0.6, seed=4), 16000))
            assert turn.status_code == 200, turn.text
            text = (await http.get("/metrics")).text
    finally:
        await backend.close()
        await client.aclose()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p.title)
async def test_every_panel_queries_exported_metrics_and_labels(exported, panel):
    for _, expr in panel.queries:
        names, labels = queried_series(expr)
        assert names, expr
        for name in names:
            assert name in exported, f"{panel.title}: {name} is not exported at /metrics ({expr})"
            assert labels <= exported[name], f"{panel.title}: {name} has no label {labels - exported[name]}"
