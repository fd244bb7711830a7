"""Every server event `/v1/realtime` can emit, through the voice-agent clients' own event handling: pipecat 1.14's
models and LiveKit Agents 1.8's receive loop (`tests/clients/check_events.py`), run in their own venv
(`make clients-venv`), since they pin a protobuf the server's vLLM cannot take."""

from __future__ import annotations

import json
import subprocess
import typing
from pathlib import Path

import pytest

from cluster.api.realtime import events as wire
from tests.test_realtime_events import every_server_event

REPO = Path(__file__).resolve().parents[1]
CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"


def test_pipecat_and_livekit_take_every_server_event():
    if not CLIENTS_PYTHON.exists():
        pytest.fail("the clients' venv is missing: run `make clients-venv` (make test does)")
    sent = "\n".join(event.model_dump_json() for event in every_server_event())
    run = subprocess.run([str(CLIENTS_PYTHON), str(REPO / "tests" / "clients" / "check_events.py")], input=sent,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert set(report) == {cls.model_fields["type"].default for cls in typing.get_args(wire.ServerEvent)}
    assert {kind: seen for kind, seen in report.items() if any(v.startswith("error") for v in seen.values())} == {}
    assert {seen["pipecat"] for seen in report.values()} == {"parsed"}  # pipecat models every one of them
    handled = {kind for kind, seen in report.items() if seen["livekit"] == "parsed"}
    assert {"response.created", "response.done", "conversation.item.added", "response.output_audio.delta",
            "input_audio_buffer.speech_started", "error"} <= handled
