"""Request bodies and content types: caller audio in, the reply format out, body size limits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from starlette.requests import ClientDisconnect, Request

from cluster.errors import BadRequest, NotAcceptable, TooLarge, UnsupportedMediaType
from cluster.state.store import Session
from model.errors import InvalidInput
from model.processing.audio import ReplyFormat

PCM_TYPES = ("audio/pcm", "audio/x-pcm", "audio/pcm16")
MULAW_TYPES = ("audio/basic", "audio/pcmu", "audio/x-mulaw", "audio/mulaw")
ALAW_TYPES = ("audio/pcma", "audio/x-alaw", "audio/alaw")
WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave")
CONTAINER_TYPES = (*WAV_TYPES, "audio/vnd.wave", "audio/flac", "audio/x-flac", "audio/ogg", "application/ogg",
                   "application/octet-stream")


def media_type(header: str | None) -> tuple[str, dict[str, str]]:
    """'audio/pcm; rate=16000' -> ('audio/pcm', {'rate': '16000'})."""
    if not header:
        return "", {}
    kind, *params = (p.strip() for p in header.split(";"))
    parsed = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            parsed[k.strip().lower()] = v.strip().strip('"')
    return kind.lower(), parsed


def caller_encoding(content_type: str | None) -> tuple[str | None, int | None]:
    """Content-Type of a turn body -> (decode_audio encoding, sample rate). None (no header, a container type)
    means the container is sniffed from the bytes (WAV, FLAC, OGG)."""
    kind, params = media_type(content_type)
    rate = params.get("rate")
    if rate is not None:
        try:
            rate = int(rate)
        except ValueError:
            raise InvalidInput(f"rate parameter {params['rate']!r} is not an integer", code="invalid_content_type") from None
    if not kind or kind in CONTAINER_TYPES:
        return None, None  # the container header gives the rate
    if kind in PCM_TYPES:
        if rate is None:
            raise InvalidInput(f"{kind} needs a rate parameter, e.g. '{kind};rate=16000'", code="invalid_content_type")
        return "pcm16", rate
    if kind in MULAW_TYPES:
        return "mulaw", rate or 8000
    if kind in ALAW_TYPES:
        return "alaw", rate or 8000
    raise UnsupportedMediaType(
        f"unsupported caller audio type {kind!r}: send audio/wav (or FLAC/OGG), audio/pcm;rate=N, audio/basic or "
        "audio/pcma"
    )


def negotiate_reply(accept: str | None, session: Session) -> tuple[bool, ReplyFormat]:
    """Accept header -> (server-sent events?, audio format). SSE carries the session's output_format."""
    if not accept:
        return True, session.output_format
    ranges = []
    for n, item in enumerate(accept.split(",")):
        kind, params = media_type(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append((-q, n, kind, params))
    for _, _, kind, params in sorted(ranges):
        if kind in ("text/event-stream", "*/*", "text/*"):
            return True, session.output_format
        if kind in PCM_TYPES and (rate := params.get("rate", "24000")) in ("24000", "16000"):
            return False, ReplyFormat.PCM16_24K if rate == "24000" else ReplyFormat.PCM16_16K
        if kind in MULAW_TYPES:
            return False, ReplyFormat.MULAW_8K
        if kind in ALAW_TYPES:
            return False, ReplyFormat.ALAW_8K
        if kind in WAV_TYPES:
            return False, ReplyFormat.WAV
        if kind == "audio/*":
            return False, session.output_format
    raise NotAcceptable(
        "no acceptable reply type: accept text/event-stream, audio/pcm;rate=24000, audio/pcm;rate=16000, "
        "audio/basic, audio/pcma or audio/wav"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes: by Content-Length first, then by counting what arrives."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise TooLarge(f"request body is {size} bytes; the limit is {limit} bytes", code="body_too_large")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise TooLarge(f"request body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client went away while sending the body", code="client_disconnected") from None
    return b"".join(chunks)


def replay(body: bytes) -> Callable:
    """An ASGI receive channel that hands `body` out again (to parse a form from a body already read)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def check_duration(wave: np.ndarray, rate: int, limit: float, what: str) -> None:
    seconds = wave.size / rate
    if seconds > limit:
        raise TooLarge(f"{what} is {seconds:.1f} s long; the limit is {limit:g} s", code="audio_too_long")
