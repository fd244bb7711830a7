"""The OpenAI Realtime (GA) wire events this server speaks, as pydantic models: client events are validated in
through `CLIENT_EVENT` (one discriminated union: an unknown `type` is `invalid_event_type`), server events are
built as models and serialised out. Clients send fields we do not use (tools, tracing, ...): accepted and ignored.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, TypeAdapter, model_validator
from pydantic_core import PydanticCustomError

from cluster.calls.audio import LineFormat
from cluster.state.history import Truncation


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- shared shapes ----------------------------------------------------------------------------------------
class PcmFormat(_Lenient):
    type: Literal["audio/pcm"]
    rate: Literal[24000] = 24000


class G711Format(_Lenient):
    type: Literal["audio/pcmu", "audio/pcma"]


AudioFormat = Annotated[PcmFormat | G711Format, Field(discriminator="type")]
LINES = {"audio/pcm": LineFormat.PCM16_24K, "audio/pcmu": LineFormat.PCMU, "audio/pcma": LineFormat.PCMA}


def line_of(audio_format: PcmFormat | G711Format) -> LineFormat:
    return LINES[audio_format.type]


def format_of(line: LineFormat) -> PcmFormat | G711Format:
    kind = next(k for k, v in LINES.items() if v is line)
    return PcmFormat(type=kind) if line is LineFormat.PCM16_24K else G711Format(type=kind)


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise PydanticCustomError("invalid_event", "must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError("invalid_base64", "is not valid base64") from None


Base64 = Annotated[bytes, BeforeValidator(_base64)]


# ---- client events ----------------------------------------------------------------------------------------
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


class Transcription(_Lenient):
    """Input transcription: the Reasoner transcribes, whatever `model` names; `language` and `prompt` are echoed."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class AudioInput(_Lenient):
    format: AudioFormat | None = None
    turn_detection: dict | None = None  # read only when given (`model_fields_set`): null turns it off
    transcription: Transcription | None = None  # likewise: null turns it off


class AudioOutput(_Lenient):
    format: AudioFormat | None = None
    voice: str | None = None
    speed: float | None = None


class AudioConfig(_Lenient):
    input: AudioInput = Field(default_factory=AudioInput)
    output: AudioOutput = Field(default_factory=AudioOutput)


class SessionConfig(_Lenient):
    """GA session fields; those this server does nothing with (tracing, noise_reduction, max_output_tokens, ...) are
    accepted and ignored, those it cannot honour are named by `unsupported`."""

    instructions: str | None = None
    audio: AudioConfig = Field(default_factory=AudioConfig)
    truncation: Truncation | None = None
    output_modalities: list[str] | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> str | None:
        """What the session asks for that no reply here can do, naming the field."""
        if self.tools:
            return "session.tools: function and MCP tools are not supported; send an empty list"
        if self.output_modalities not in (None, ["audio"]):
            return f"session.output_modalities {self.output_modalities}: replies are spoken, use [\"audio\"]"
        if self.audio.output.speed not in (None, 1.0):
            return f"session.audio.output.speed {self.audio.output.speed:g}: the voice speaks at 1.0 only"
        return None

    @model_validator(mode="before")
    @classmethod
    def _fold_beta(cls, raw: Any) -> Any:
        """The beta spellings at the top level (input_audio_format, turn_detection, voice) fold into `audio`."""
        if not isinstance(raw, dict):
            return raw
        audio = raw.get("audio") or {}
        if not isinstance(audio, dict):
            return raw  # not an object: the model's own validation names it
        audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
        if not isinstance(audio_in, dict) or not isinstance(audio_out, dict):
            return raw  # not objects: the model's own validation names them
        audio_in, audio_out = dict(audio_in), dict(audio_out)
        for beta, target in (("input_audio_format", audio_in), ("output_audio_format", audio_out)):
            if beta in raw:
                name = raw[beta]
                target["format"] = {"type": BETA_FORMATS.get(name, name) if isinstance(name, str) else name}
        if "turn_detection" in raw:
            audio_in["turn_detection"] = raw["turn_detection"]
        if "voice" in raw:
            audio_out["voice"] = raw["voice"]
        return {**raw, "audio": {"input": audio_in, "output": audio_out}}


class ContentIn(_Lenient):
    type: str
    text: str | None = None
    audio: Base64 | None = None


TEXT_PARTS = ("input_text", "output_text", "text")  # GA, GA assistant, beta; pipecat sends input_text for any role


class MessageItem(_Lenient):
    """A message the client puts in the conversation: the caller's (typed text and/or audio), or a system or
    assistant message (text only)."""

    id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")  # the client's, kept
    type: Literal["message"] = "message"
    role: Literal["user", "system", "assistant"]
    content: list[ContentIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _parts(self) -> MessageItem:
        taken = TEXT_PARTS + (("input_audio",) if self.role == "user" else ())
        for part in self.content:
            if part.type not in taken:
                raise PydanticCustomError("invalid_event", "content type {part} is not taken in a {role} message "
                                          "(it takes {taken})", {"part": repr(part.type), "role": self.role,
                                                                 "taken": ", ".join(taken)})
        return self

    @property
    def text(self) -> str | None:
        return " ".join(p.text for p in self.content if p.type in TEXT_PARTS and p.text) or None


class _ClientEvent(_Lenient):
    event_id: str | None = None


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: Base64


class InputAudioBufferCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ConversationItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    item: MessageItem


class ConversationItemTruncate(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: Literal[0] = 0  # the item's audio: the only part there is
    audio_end_ms: StrictInt


class ConversationItemDelete(_ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str


class ResponseParams(_Lenient):
    metadata: dict[str, str] | None = None  # comes back on response.created and response.done


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: ResponseParams = Field(default_factory=ResponseParams)


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


class ConversationItemRetrieve(_ClientEvent):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class OutputAudioBufferClear(_ClientEvent):
    type: Literal["output_audio_buffer.clear"]


ClientEvent = Annotated[
    Union[SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear,
          ConversationItemCreate, ConversationItemTruncate, ConversationItemDelete, ConversationItemRetrieve,
          ResponseCreate, ResponseCancel, OutputAudioBufferClear],
    Field(discriminator="type"),
]
CLIENT_EVENT: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)


# ---- server events ----------------------------------------------------------------------------------------
def _event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


class _ServerEvent(BaseModel):
    event_id: str = Field(default_factory=_event_id)


class InputText(BaseModel):
    type: Literal["input_text"] = "input_text"
    text: str


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str


class InputAudio(BaseModel):
    type: Literal["input_audio"] = "input_audio"
    transcript: str | None = None


class OutputAudio(BaseModel):
    type: Literal["output_audio"] = "output_audio"
    transcript: str


class Item(BaseModel):
    id: str
    object: Literal["realtime.item"] = "realtime.item"
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[InputText | OutputText | InputAudio | OutputAudio]


class ResponseError(BaseModel):
    type: Literal["server_error"] = "server_error"
    code: str | None


class StatusDetails(BaseModel):
    type: Literal["cancelled", "failed", "incomplete"]
    reason: Literal["turn_detected", "client_cancelled"] | None  # of a cancelled reply; a failed one has `error`
    error: ResponseError | None = None


class InputTokenDetails(BaseModel):
    cached_tokens: int
    text_tokens: int  # the prompt's positions that are not caller audio are not told apart here: all count as text
    audio_tokens: int = 0


class OutputTokenDetails(BaseModel):
    text_tokens: int
    audio_tokens: int  # Mimi frames


class Usage(BaseModel):
    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_token_details: InputTokenDetails
    output_token_details: OutputTokenDetails


class Response(BaseModel):
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    status_details: StatusDetails | None = None
    output: list[Item] = Field(default_factory=list)
    output_modalities: list[Literal["audio"]] = Field(default_factory=lambda: ["audio"])
    conversation_id: None = None
    metadata: dict[str, str] | None = None
    usage: Usage | None = None


class SessionAudioInput(BaseModel):
    format: PcmFormat | G711Format
    turn_detection: dict | None
    transcription: Transcription | None = None


class SessionAudioOutput(BaseModel):
    format: PcmFormat | G711Format
    voice: str | None


class SessionAudio(BaseModel):
    input: SessionAudioInput
    output: SessionAudioOutput


class SessionInfo(BaseModel):
    type: Literal["realtime"] = "realtime"
    id: str
    object: Literal["realtime.session"] = "realtime.session"
    model: str
    output_modalities: list[Literal["audio"]] = Field(default_factory=lambda: ["audio"])
    instructions: str
    truncation: Any
    audio: SessionAudio


class SessionCreated(_ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionInfo


class SessionUpdated(_ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionInfo


class ErrorInfo(BaseModel):
    type: Literal["invalid_request_error", "server_error"]
    code: str
    message: str
    param: None = None
    event_id: str | None = None


class Error(_ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorInfo

    @classmethod
    def of(cls, code: str, message: str, event_id: str | None = None) -> Error:
        kind = "server_error" if code in ("internal_error", "server_error") else "invalid_request_error"
        return cls(error=ErrorInfo(type=kind, code=code, message=message, event_id=event_id))


class SpeechStarted(_ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(_ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class BufferCommitted(_ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None


class BufferCleared(_ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class ItemAdded(_ServerEvent):
    type: Literal["conversation.item.added"] = "conversation.item.added"
    previous_item_id: str | None = None
    item: Item


class ItemDone(_ServerEvent):
    type: Literal["conversation.item.done"] = "conversation.item.done"
    item: Item


class ItemRetrieved(_ServerEvent):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: Item


class ItemDeleted(_ServerEvent):
    type: Literal["conversation.item.deleted"] = "conversation.item.deleted"
    item_id: str


class ItemTruncated(_ServerEvent):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: Literal[0] = 0
    audio_end_ms: int


class ResponseCreated(_ServerEvent):
    type: Literal["response.created"] = "response.created"
    response: Response


class ResponseDone(_ServerEvent):
    type: Literal["response.done"] = "response.done"
    response: Response


class OutputItemAdded(_ServerEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: Literal[0] = 0
    item: Item


class OutputItemDone(_ServerEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: Literal[0] = 0
    item: Item


class _Part(_ServerEvent):
    """Of the reply's one audio part: every reply has one item with one content part."""

    response_id: str
    item_id: str
    output_index: Literal[0] = 0
    content_index: Literal[0] = 0


class AudioPart(BaseModel):
    type: Literal["audio"] = "audio"
    transcript: str


class ContentPartAdded(_Part):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: AudioPart


class ContentPartDone(_Part):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: AudioPart


class AudioDelta(_Part):
    type: Literal["response.output_audio.delta"] = "response.output_audio.delta"
    delta: str  # base64


class AudioDone(_Part):
    type: Literal["response.output_audio.done"] = "response.output_audio.done"


class TranscriptDelta(_Part):
    type: Literal["response.output_audio_transcript.delta"] = "response.output_audio_transcript.delta"
    delta: str


class TranscriptDone(_Part):
    type: Literal["response.output_audio_transcript.done"] = "response.output_audio_transcript.done"
    transcript: str


class InputTranscriptionDelta(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta")
    item_id: str
    content_index: int = 0
    delta: str


class TranscriptionUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class InputTranscriptionCompleted(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed")
    item_id: str
    content_index: int = 0
    transcript: str
    usage: TranscriptionUsage


class TranscriptionError(BaseModel):
    type: Literal["transcription_error"] = "transcription_error"
    code: str
    message: str
    param: None = None


class InputTranscriptionFailed(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed")
    item_id: str
    content_index: int = 0
    error: TranscriptionError


ServerEvent = Union[
    SessionCreated, SessionUpdated, Error, SpeechStarted, SpeechStopped, BufferCommitted, BufferCleared, ItemAdded,
    ItemDone, ItemRetrieved, ItemDeleted, ItemTruncated, ResponseCreated, ResponseDone, OutputItemAdded, OutputItemDone,
    ContentPartAdded, ContentPartDone, AudioDelta, AudioDone, TranscriptDelta, TranscriptDone, InputTranscriptionDelta,
    InputTranscriptionCompleted, InputTranscriptionFailed,
]
