"""A small HTTP client of the chroma-serve API, used by `chroma-serve demo` and the cluster benchmark.

A turn is streamed as server-sent events: text deltas, base64 PCM16 24 kHz audio chunks, then `done` with the
server's timings. Time to first audio is measured here, at the client: from the moment the caller's audio has
been sent (the end of the caller's turn) to the first audio chunk received.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import httpx
import numpy as np

from model.processing.audio import CODEC_RATE, encode_wav


class ApiError(RuntimeError):
    """An error answer (`status` 4xx/5xx), or an `error` event that ended a streamed reply (`status` 200)."""

    def __init__(self, status: int, body: str):
        self.code, self.retryable = None, False
        try:
            error = json.loads(body)["error"]
            message = f"HTTP {status} {error['code']}: {error['message']}"
            self.code, self.retryable = error["code"], bool(error.get("retryable"))
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {status}: {body[:500]}"
        super().__init__(message)
        self.status = status


@dataclass
class TurnReply:
    text: str = ""
    audio: list[np.ndarray] = field(default_factory=list)  # int16 chunks at 24 kHz, as they arrived
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk, from the end of the upload
    done: dict = field(default_factory=dict)  # the server's final event: frames, text, timings

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.int16)

    @property
    def ttfa_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def audio_seconds(self) -> float:
        return sum(len(a) for a in self.audio) / CODEC_RATE

    @property
    def total_s(self) -> float:
        return self.chunk_times_s[-1] if self.chunk_times_s else 0.0

    @property
    def rtf(self) -> float | None:
        """Generation time over audio duration, as the client sees it."""
        return self.total_s / self.audio_seconds if self.audio_seconds else None

    @property
    def gap_s(self) -> float:
        """Silence a caller would hear inside the reply, playing each chunk as it arrives (no jitter buffer): 0 for
        a reply that streams in real time, however long its first audio took."""
        return sum(playback_gaps((t, len(a) / CODEC_RATE) for t, a in zip(self.chunk_times_s, self.audio)))


def playback_gaps(chunks: Iterable[tuple[float, float]], buffer_s: float = 0.0) -> list[float]:
    """The silences (s) of audio played on a real-time clock as it arrives. `chunks` are (arrival, duration) in
    seconds, in order; playback starts `buffer_s` after the first arrival and, after a gap, resumes with the chunk
    that ended it."""
    gaps, playing_until = [], None
    for arrived, seconds in chunks:
        if playing_until is None:
            playing_until = arrived + buffer_s
        elif arrived > playing_until:
            gaps.append(arrived - playing_until)
            playing_until = arrived
        playing_until += seconds
    return gaps


def _sse_events(lines: list[str]):
    fields = dict(line.split(": ", 1) for line in lines if ": " in line)
    return fields.get("event"), json.loads(fields.get("data", "null"))


class ChromaClient:
    def __init__(self, url: str, api_key: str, timeout_s: float = 300.0):
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s)

    async def __aenter__(self) -> ChromaClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def _json(self, reply: httpx.Response, expected: int) -> dict:
        if reply.status_code != expected:
            raise ApiError(reply.status_code, reply.text)
        return reply.json()

    async def create_voice(self, name: str, transcript: str, audio: np.ndarray, sample_rate: int) -> dict:
        files = {"audio": ("voice.wav", encode_wav(audio, sample_rate), "audio/wav")}
        reply = await self.http.post("/v1/voices", files=files, data={"transcript": transcript, "name": name})
        return await self._json(reply, 201)

    async def create_session(self, voice_id: str, **settings) -> dict:
        return await self._json(await self.http.post("/v1/sessions", json={"voice_id": voice_id, **settings}), 201)

    async def delete_session(self, session_id: str) -> None:
        await self.http.delete(f"/v1/sessions/{session_id}")

    async def turn(self, session_id: str, audio: np.ndarray, sample_rate: int) -> TurnReply:
        reply = TurnReply()
        async for event, data, at in self.turn_events(session_id, audio, sample_rate):
            if event == "text":
                reply.text += data["delta"]
            elif event == "audio":
                reply.audio.append(np.frombuffer(base64.b64decode(data["data"]), np.int16))
                reply.chunk_times_s.append(at)
            elif event == "done":
                reply.done = data
            elif event == "error":
                raise ApiError(200, json.dumps(data))  # the event data is already the error body
        return reply

    async def turn_events(self, session_id: str, audio: np.ndarray, sample_rate: int) -> AsyncIterator[tuple[str, dict, float]]:
        """(event, data, seconds since the caller's audio was sent) as the reply streams in."""
        body = encode_wav(audio, sample_rate)
        headers = {"Content-Type": "audio/wav", "Accept": "text/event-stream"}
        started = time.perf_counter()
        async with self.http.stream("POST", f"/v1/sessions/{session_id}/turns", content=body, headers=headers) as reply:
            if reply.status_code != 200:
                raise ApiError(reply.status_code, (await reply.aread()).decode(errors="replace"))
            lines: list[str] = []
            async for line in reply.aiter_lines():
                if line:
                    lines.append(line)
                    continue
                if lines:
                    event, data = _sse_events(lines)
                    lines = []
                    yield event, data, time.perf_counter() - started
