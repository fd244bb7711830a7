"""Every server event `/v1/realtime` can emit, built as the connection builds it, validates against the official
`openai` SDK's `RealtimeServerEvent`; client events parse into their models, and malformed ones into the codes
clients match on."""

from __future__ import annotations

import json
import typing

import pytest
from pydantic import TypeAdapter, ValidationError

from cluster.api.realtime import events as wire
from cluster.api.realtime.connection import _invalid, _reply_finished, _reply_started, _text_item, _user_item
from cluster.calls.audio import LineFormat
from cluster.calls.events import ReplyFinished, ReplyStarted, Usage


def every_server_event() -> list[wire._ServerEvent]:
    started = ReplyStarted("resp_1", "item_2", "item_1", {"client_event_id": "c1"})
    session = wire.SessionInfo(
        id="sess_1", model="chroma-1.0", instructions="Be brief.", truncation="auto",
        audio=wire.SessionAudio(
            input=wire.SessionAudioInput(format=wire.format_of(LineFormat.PCMU),
                                         turn_detection={"type": "server_vad", "threshold": 0.5},
                                         transcription=wire.Transcription(model="whisper-1", language="en")),
            output=wire.SessionAudioOutput(format=wire.format_of(LineFormat.PCM16_24K), voice="voice_1")))
    part = {"response_id": "resp_1", "item_id": "item_2"}
    return [
        wire.SessionCreated(session=session), wire.SessionUpdated(session=session),
        wire.Error.of("invalid_event", "bad", "event_9"), wire.Error.of("server_error", "ours"),
        wire.SpeechStarted(audio_start_ms=10, item_id="item_1"), wire.SpeechStopped(audio_end_ms=900, item_id="item_1"),
        wire.BufferCommitted(item_id="item_1", previous_item_id=None), wire.BufferCleared(),
        wire.ItemAdded(previous_item_id="item_0", item=_user_item("item_1", None)),
        wire.ItemAdded(item=_user_item("item_3", "Hello?")), wire.ItemDone(item=_user_item("item_3", "Hello?")),
        wire.ItemRetrieved(item=_user_item("item_3", "Hello?")), wire.ItemDeleted(item_id="item_1"),
        wire.ItemAdded(previous_item_id="item_3", item=_text_item("item_4", "system", "Be brief.")),
        wire.ItemDone(item=_text_item("item_5", "assistant", "I said this.")),
        wire.ItemTruncated(item_id="item_2", audio_end_ms=640),
        wire.AudioDelta(**part, delta="AAAA"), wire.TranscriptDelta(**part, delta="Hi"),
        wire.InputTranscriptionDelta(item_id="item_1", delta="Hel"),
        wire.InputTranscriptionCompleted(item_id="item_1", transcript="Hello?", usage=wire.TranscriptionUsage(seconds=1.2)),
        wire.InputTranscriptionFailed(item_id="item_1", error=wire.TranscriptionError(code="context_full", message="x")),
        *_reply_started(started),
        *_reply_finished(ReplyFinished("resp_1", "item_2", "completed", None, "Hi there.", {"client_event_id": "c1"},
                                       Usage(input_tokens=120, cached_tokens=96, text_tokens=9, audio_frames=30))),
        *_reply_finished(ReplyFinished("resp_1", "item_2", "cancelled", "turn_detected", "Hi")),
        *_reply_finished(ReplyFinished("resp_1", "item_2", "cancelled", "truncated", "Hi")),
        *_reply_finished(ReplyFinished("resp_1", "item_2", "failed", "over_capacity", "")),
    ]


def test_every_server_event_is_one_the_openai_sdk_parses():
    from openai.types.realtime import RealtimeServerEvent

    sdk = TypeAdapter(RealtimeServerEvent)
    built = every_server_event()
    assert {type(e) for e in built} == set(typing.get_args(wire.ServerEvent))  # each kind, at least once
    for event in built:
        sent = json.loads(event.model_dump_json())
        parsed = sdk.validate_python(sent)
        assert parsed.type == sent["type"]


@pytest.mark.parametrize(("message", "code"), [
    ({"no": "type"}, "invalid_event"),
    ({"type": 5}, "invalid_event"),
    ({"type": "response.teleport"}, "invalid_event_type"),
    ({"type": "input_audio_buffer.append", "audio": "@@@not base64@@@"}, "invalid_base64"),
    ({"type": "input_audio_buffer.append", "audio": 12}, "invalid_event"),
    ({"type": "conversation.item.truncate", "item_id": "item_1", "audio_end_ms": "10"}, "invalid_event"),
    ({"type": "conversation.item.truncate", "item_id": "item_1", "audio_end_ms": 10, "content_index": 1},
     "invalid_event"),
    ({"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/mp3"}}}}}, "invalid_event"),
    ({"type": "session.update", "session": "realtime"}, "invalid_event"),
    ({"type": "session.update", "session": {"audio": {"input": 5}}}, "invalid_event"),
    ({"type": "session.update", "session": {"audio": ["input"]}}, "invalid_event"),
    ({"type": "conversation.item.create", "item": {"role": "user", "content": []}}, "invalid_event"),
    ({"type": "conversation.item.create", "item": {"role": "system", "content": [{"type": "input_audio",
                                                                                  "audio": "AAAA"}]}}, "invalid_event"),
    ({"type": "conversation.item.create", "item": {"role": "tool", "content": [{"type": "input_text", "text": "x"}]}},
     "invalid_event"),
])
def test_malformed_client_events_get_the_codes_clients_match_on(message, code):
    with pytest.raises(ValidationError) as error:
        wire.CLIENT_EVENT.validate_python(message)
    got, text = _invalid(error.value, message)
    assert got == code and text and "Traceback" not in text


def test_message_items_take_the_text_parts_each_client_sends():
    for role, part in (("system", "input_text"), ("assistant", "output_text"), ("assistant", "input_text"),
                       ("assistant", "text"), ("user", "input_text")):
        event = wire.CLIENT_EVENT.validate_python({"type": "conversation.item.create", "item": {
            "type": "message", "role": role, "content": [{"type": part, "text": "Be"}, {"type": part, "text": "brief."}]}})
        assert (event.item.role, event.item.text) == (role, "Be brief.")
    message = {"type": "conversation.item.create", "item": {"role": "system", "content": [
        {"type": "input_audio", "audio": "AAAA"}]}}
    with pytest.raises(ValidationError) as error:
        wire.CLIENT_EVENT.validate_python(message)
    assert "'input_audio' is not taken in a system message" in _invalid(error.value, message)[1]


def test_client_events_parse_beta_spellings_and_leave_unsent_settings_alone():
    update = wire.CLIENT_EVENT.validate_python({"type": "session.update", "session": {
        "input_audio_format": "g711_ulaw", "voice": "voice_1", "turn_detection": None, "tools": [{"type": "x"}]}})
    audio = update.session.audio
    assert wire.line_of(audio.input.format) is LineFormat.PCMU and audio.output.voice == "voice_1"
    assert "turn_detection" in audio.input.model_fields_set and audio.input.turn_detection is None
    plain = wire.CLIENT_EVENT.validate_python({"type": "session.update", "session": {"instructions": "Hi."}})
    assert "turn_detection" not in plain.session.audio.input.model_fields_set
    append = wire.CLIENT_EVENT.validate_python({"type": "input_audio_buffer.append", "audio": "AAE="})
    assert append.audio == b"\x00\x01"


@pytest.mark.parametrize(("session", "named"), [
    ({"tools": [{"type": "function", "name": "lookup"}]}, "session.tools"),
    ({"output_modalities": ["text"]}, "session.output_modalities"),
    ({"audio": {"output": {"speed": 1.5}}}, "session.audio.output.speed"),
])
def test_what_a_session_cannot_have_is_named(session, named):
    update = wire.CLIENT_EVENT.validate_python({"type": "session.update", "session": {"type": "realtime", **session}})
    assert update.session.unsupported().startswith(named)


def test_the_ga_session_fields_clients_send_are_accepted():
    update = wire.CLIENT_EVENT.validate_python({"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["audio"], "instructions": "Hi.", "tools": [], "tool_choice": "auto",
        "max_output_tokens": "inf", "tracing": None, "truncation": "auto",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "noise_reduction": None,
                            "transcription": {"model": "whisper-1"},
                            "turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000, "create_response": True,
                                               "interrupt_response": True}},
                  "output": {"format": {"type": "audio/pcmu"}, "voice": "voice_1", "speed": 1.0}}}})
    assert update.session.unsupported() is None
