"""The browser console (/console) holds a call on the live cluster in a real browser: Debian's chromium driven by
Playwright (tests/clients/console_call.py, in the clients' venv), its microphone a looped espeak-ng utterance. The
checkpoint's weights are RANDOM: what matters is that audio played, a transcript showed and a barge-in stopped
playback, read from the page's state, never from timings."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.live_cluster.test_realtime import voice_id  # noqa: F401 (a fixture)
from tests.test_client_models import CLIENTS_PYTHON, REPO

pytestmark = pytest.mark.vllm


def test_the_console_holds_a_call_with_a_barge_in_in_a_real_browser(cluster, voice_id):  # noqa: F811
    if not CLIENTS_PYTHON.exists():
        pytest.fail("the clients' venv is missing: run `make clients-venv` (make test does)")
    if shutil.which("chromium") is None:
        pytest.fail("chromium is missing: `make setup` installs it")
    run = subprocess.run([str(CLIENTS_PYTHON), str(REPO / "tests" / "clients" / "console_call.py"), cluster["url"],
                          "key-acme", voice_id], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    # Without a key the page neither opens a call nor asks the API anything.
    assert report["no_key"] == {**report["no_key"], "error": "no_key", "websockets": 0, "api_requests": []}
    assert report["clone"]["state"] == "ok", report["clone"]  # a voice cloned from a recording of the microphone
    assert report["connected"] and report["subprotocol"] == "realtime", report["events"]
    call, transcript = report["call"], report["transcript"]
    assert int(call["repliesPlayed"]) >= 1 and int(call["playedMs"]) > 0, report["events"]  # a reply's audio played
    assert any(turn["role"] == "assistant" and turn["text"].strip() for turn in transcript)  # and its transcript showed
    # The looped utterance spoke over a reply: its playback stopped at speech_started.
    assert int(call["bargeIns"]) >= 1, report["events"]
    assert any(turn["role"] == "assistant" and turn["interrupted"] for turn in transcript)
    assert report["hung_up"]
    assert any(url.endswith("/v1/realtime") for url in report["urls"]) and not report["key_in_url"], report["urls"]
    assert report["page_errors"] == []
