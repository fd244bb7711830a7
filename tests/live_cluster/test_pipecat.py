"""pipecat 1.14's `OpenAIRealtimeLLMService` holds a call on the live cluster's /v1/realtime, built by README's
"Connect pipecat" block and driven through pipecat's own pipeline (`tests/clients/pipecat_call.py`, in the
clients' venv): a server-VAD turn answered in our voice, a barge-in that cancels the reply and cuts the history to
what pipecat played, the caller's transcript in pipecat's context, pipecat's opening run answered with a greeting, a
text message (which pipecat sends as a `system` item) answered aloud, and nothing pipecat logs as an error. Weights
are RANDOM."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.live_cluster.test_realtime import history, voice_id  # noqa: F401 (voice_id: the module's fixture)
from tests.test_client_models import CLIENTS_PYTHON, REPO

TEXT = "Please say something short about the sea."  # what tests/clients/pipecat_call.py types

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def report(cluster, voice_id):  # noqa: F811
    if not CLIENTS_PYTHON.exists():
        pytest.fail("the clients' venv is missing: run `make clients-venv` (make test does)")
    run = subprocess.run([str(CLIENTS_PYTHON), str(REPO / "tests" / "clients" / "pipecat_call.py"),
                          "--url", cluster["url"], "--key", "key-acme", "--voice", voice_id,
                          "--readme", str(REPO / "README.md")], capture_output=True, text=True, timeout=300)
    assert run.stdout, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert found["failures"] == [], found["failures"]  # pipecat logged no error; no error event, no ErrorFrame
    assert run.returncode == 0, run.stderr[-3000:]
    return found


def test_the_session_is_pipecats_example_with_our_voice(report, voice_id):  # noqa: F811
    session = report["steps"]["session"]
    assert session["voice"] == voice_id
    assert session["turn_detection"]["type"] == "semantic_vad"  # what pipecat's example asks for
    assert report["pipecat"]["log_problems"] == []


def test_a_spoken_question_gets_a_spoken_reply_with_its_transcript(report):
    turn = report["steps"]["voice_turn"]
    assert turn["events"][:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                  "input_audio_buffer.committed"]
    assert turn["response"]["status"] == "completed"
    spoken = report["pipecat"]["spoken"][turn["spoken"]]
    assert spoken["audio_bytes"] > 0
    assert spoken["text"] == "".join(report["wire"]["transcripts"].get(turn["response"]["id"], []))
    assert any(s["text"] for s in report["pipecat"]["spoken"])  # RANDOM weights: some replies say no word
    assert report["pipecat"]["played_bytes"] > 0  # pipecat's output transport played it
    assert report["pipecat"]["frames"]["BotStartedSpeakingFrame"] >= 1


def test_the_caller_is_transcribed_into_pipecats_context_and_the_history(report, cluster):
    turn = report["steps"]["voice_turn"]
    assert turn["transcript"] in report["pipecat"]["user_transcripts"]  # pipecat pushed it as a TranscriptionFrame
    turns = {m["id"]: m for m in history(cluster, report["steps"]["session"]["id"])["history"]}
    assert turns[turn["item_id"]]["transcript"] == turn["transcript"]


def test_a_barge_in_cancels_the_reply_and_the_history_keeps_what_pipecat_played(report, cluster):
    barge_in = report["steps"]["barge_in"]
    reply = barge_in["response"]
    assert barge_in["speech_started_during_reply"]
    assert reply["status"] == "cancelled" and reply["status_details"]["reason"] == "turn_detected"
    assert barge_in["pipecat_item"] == {"id": reply["item_id"], "role": "assistant", "status": "incomplete"}
    # pipecat truncated the reply to what it played, and the server took it as sent.
    truncate = barge_in["truncate"]
    assert truncate["item_id"] == reply["item_id"]
    fields = ("item_id", "content_index", "audio_end_ms")
    assert {k: barge_in["truncated"][k] for k in fields} == {k: truncate[k] for k in fields}
    # Token k entered with frame 2k; each transcript delta is one token.
    deltas = report["wire"]["transcripts"].get(reply["id"], [])  # RANDOM weights: it may have said no word yet
    heard_frames = truncate["audio_end_ms"] // 80
    turns = {m["id"]: m for m in history(cluster, report["steps"]["session"]["id"])["history"]}
    assert turns[reply["item_id"]]["text"] == "".join(deltas[: math.ceil(heard_frames / 2)])
    # The interruption is a turn of its own, answered.
    assert barge_in["next_response"]["status"] == "completed"


def test_pipecats_opening_run_greets_with_nothing_said(report, cluster):
    greeting = report["steps"]["greeting"]
    assert greeting["response"]["status"] == "completed"
    assert report["pipecat"]["spoken"][greeting["spoken"]]["audio_bytes"] > 0
    turns = history(cluster, report["steps"]["session"]["id"])["history"]
    assert (turns[0]["id"], turns[0]["role"]) == (greeting["response"]["item_id"], "assistant")


def test_a_text_message_goes_in_as_a_system_item_and_gets_a_spoken_answer(report, cluster):
    text = report["steps"]["text"]
    item = text["item_create"]["item"]
    assert item["role"] == "system" and item["content"] == [{"type": "input_text", "text": TEXT}]
    assert text["item_added"]["item"]["id"] == item["id"]  # the client's id, kept
    assert text["response"]["status"] == "completed"
    assert report["pipecat"]["spoken"][text["spoken"]]["audio_bytes"] > 0
    turns = history(cluster, report["steps"]["session"]["id"])["history"]
    assert [(m["id"], m["role"]) for m in turns[-2:]] == [(item["id"], "system"), (text["response"]["item_id"], "assistant")]
    assert turns[-2]["text"] == TEXT
