"""LiveKit Agents 1.8's own OpenAI Realtime client holds a call on the live cluster: `tests/clients/livekit_call.py`,
run in the clients' venv (`make clients-venv`: LiveKit pins a protobuf vLLM cannot take), drives its
`RealtimeSession` through its public API, with the model built by the README's "Connect LiveKit Agents" snippet.
Its report is checked here against the server's history. The checkpoint's weights are RANDOM: the replies are noise,
only their lifecycle is looked at."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.live_cluster.test_realtime import voice_id  # noqa: F401 (the fixture: a voice made on the cluster)

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"


def test_livekit_agents_holds_a_call(cluster, voice_id):  # noqa: F811
    if not CLIENTS_PYTHON.exists():
        pytest.fail("the clients' venv is missing: run `make clients-venv` (make test does)")
    run = subprocess.run([str(CLIENTS_PYTHON), str(REPO / "tests" / "clients" / "livekit_call.py"), cluster["url"],
                          "key-acme", voice_id, str(REPO / "README.md")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["voice"] == voice_id  # the README's snippet built the model, with our voice

    # The greeting: generate_reply() with nothing said completes (LiveKit waits 10 s for its response.created).
    greeting = report["greeting"]
    assert "error" not in greeting, greeting
    assert greeting["created"] and greeting["user_initiated"] and greeting["audio_ms"] > 0

    # A server-VAD turn: the espeak utterance, then an audio reply with its transcript.
    turn = report["voice_turn"]
    assert "error" not in turn, turn
    assert not turn["user_initiated"] and turn["audio_ms"] > 0 and turn["transcript"]

    # Speaking over a reply cancels its generation, and LiveKit's truncate cuts it to what was played.
    barge_in = report["barge_in"]
    assert "error" not in barge_in, barge_in
    assert barge_in["speech_started"] >= 1 and barge_in["interrupted"]
    assert barge_in["status"] == "cancelled" and barge_in["status_details"]["reason"] == "turn_detected"
    assert barge_in["truncated_ms"] == barge_in["played_ms"] and barge_in["played_ms"] <= barge_in["audio_ms"]
    assert barge_in["answer"]["audio_ms"] > 0  # the interruption itself was answered

    # A system and a user message through update_chat_ctx (LiveKit waits 5 s for each conversation.item.added),
    # then a reply.
    text = report["text_message"]
    assert "error" not in text, text
    assert text["created"] and text["audio_ms"] > 0 and text["transcript"]

    # LiveKit's copy of the history is the server's, in the same order.
    history = report["history"]
    assert "error" not in history, history
    server = {m["id"]: m for m in history["server"]}
    assert [(i["id"], i["role"]) for i in history["livekit"]] == [(m["id"], m["role"]) for m in history["server"]]
    committed = httpx.get(f"{cluster['url']}/v1/sessions/{report['session_id']}",
                          headers={"Authorization": "Bearer key-acme"}).json()["history"]
    assert [m["id"] for m in committed] == list(server)
    assert history["server"][0] == {"id": greeting["message_id"], "role": "assistant", "text": greeting["transcript"]}
    # The system message joined the history where the server's previous_item_id put it, in LiveKit's copy too.
    assert server[text["system_item"]] == {"id": text["system_item"], "role": "system",
                                           "text": "The caller's name is Ada."}
    turns = [m for m in history["server"][1:] if m["role"] != "system"]
    replies = [turn, barge_in, barge_in["answer"], text]
    assert [m["role"] for m in turns] == ["user", "assistant"] * len(replies)
    assert [m["id"] for m in turns[1::2]] == [r["message_id"] for r in replies]
    kept = server[barge_in["message_id"]]["text"]
    assert barge_in["transcript"].startswith(kept.rstrip("\ufffd"))  # what was played of it, no more
    assert server[text["user_item"]]["role"] == "user"  # under LiveKit's own item id
    assert server[text["user_item"]]["text"] == "Please say something about the sea."

    # Nothing LiveKit could not take: no event outside the SDK's models, no error, not a warning in its log.
    assert report["invalid_events"] == [] and report["errors"] == [] and report["log"] == []
    # Its interrupt() after the server cancelled the reply itself: OpenAI's wording, which LiveKit takes quietly.
    assert {e["code"] for e in report["server_errors"]} <= {"response_cancel_not_active"}
