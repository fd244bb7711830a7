"""A live-call client of `/v1/realtime` (OpenAI Realtime protocol over `websockets`), used by `chroma-serve call`,
the realtime benchmark and the Locust users.

It streams caller audio in real time (like a microphone), plays the reply on a simulated real-time clock (so
it can tell what the caller heard and whether playback ran dry) and measures, at the client:
- voice-to-voice latency: the end of the caller's speech (its last sample sent) to the first reply audio;
- barge-in to silence: the start of speech over a reply to the reply's end (`response.done` cancelled).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field

import numpy as np
import websockets

from cluster.clients.http import playback_gaps
from model.processing.audio import CODEC_RATE, pcm16_bytes

CHUNK_S = 0.1  # caller audio per message
JITTER_BUFFER_S = 0.2  # the simulated player starts this long after the first reply audio
VOICED_LEVEL = 0.01  # samples above this are speech, not the quiet around it


def websocket_url(url: str, path: str) -> str:
    """The ws:// (or wss://) URL of `path` on the HTTP base `url`."""
    return url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + path


def speech_end(started: float, audio: np.ndarray, rate: int) -> float | None:
    """When the last voiced sample of `audio`, streamed in real time from `started`, was due (None: all quiet)."""
    voiced = np.flatnonzero(np.abs(audio) > VOICED_LEVEL)
    return started + (voiced[-1] + 1) / rate if voiced.size else None


@dataclass
class ReplyPlayback:
    """One reply as the client received it, played on a real-time clock."""

    response_id: str
    item_id: str | None = None
    chunks: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, int16 samples)
    transcript: list[str] = field(default_factory=list)  # the transcript deltas, in order
    status: str | None = None
    done_at: float | None = None

    @property
    def first_audio_at(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    @property
    def audio_ms(self) -> float:
        return 1000 * sum(c.size for _, c in self.chunks) / CODEC_RATE

    def played_ms(self, at: float) -> float:
        """How much the caller had heard at time `at` (playback starts a jitter buffer after the first audio)."""
        if not self.chunks:
            return 0.0
        return max(0.0, min(self.audio_ms, 1000 * (at - self.chunks[0][0] - JITTER_BUFFER_S)))

    def underruns(self) -> int:
        """Gaps: a chunk that arrived after everything before it had played out."""
        return len(playback_gaps(((at, c.size / CODEC_RATE) for at, c in self.chunks), JITTER_BUFFER_S))

    def samples(self) -> np.ndarray:
        return np.concatenate([c for _, c in self.chunks]) if self.chunks else np.zeros(0, np.int16)


class RealtimeCaller:
    """`async with RealtimeCaller(url, key) as call:` then `configure`, `say`, `wait_reply`, ..."""

    def __init__(self, url: str, api_key: str, session_id: str | None = None):
        query = "?model=chroma-1.0" + (f"&session_id={session_id}" if session_id else "")
        self.url = websocket_url(url, "/v1/realtime" + query)
        self.api_key = api_key
        self.events: list[dict] = []
        self.replies: dict[str, ReplyPlayback] = {}
        self.speech_ended_at: float | None = None
        self._taken = 0  # replies handed out by next_reply
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> RealtimeCaller:
        self.ws = await websockets.connect(self.url, additional_headers={"Authorization": f"Bearer {self.api_key}"},
                                           max_size=None)
        self._reader = asyncio.create_task(self._read())
        await self.wait_for("session.created")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        if self._reader:
            self._reader.cancel()

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def configure(self, voice_id: str, instructions: str = "", **session) -> dict:
        await self.send({"type": "session.update", "session": {
            "type": "realtime", "instructions": instructions, "audio": {"output": {"voice": voice_id}}, **session}})
        return await self.wait_for("session.updated")

    async def say(self, audio_24k: np.ndarray, trailing_silence_s: float = 0.0) -> None:
        """Stream speech in real time (then silence), as a microphone would. `speech_ended_at` is when its last
        voiced sample was due: synthetic speech ends in a few hundred ms of its own quiet."""
        audio = np.concatenate([audio_24k, np.zeros(int(trailing_silence_s * CODEC_RATE), np.float32)])
        step = int(CHUNK_S * CODEC_RATE)
        started = time.monotonic()
        self.speech_ended_at = speech_end(started, audio_24k, CODEC_RATE) or self.speech_ended_at
        for n, i in enumerate(range(0, audio.size, step)):
            await self._append(audio[i:i + step])
            await asyncio.sleep(max(0.0, started + (n + 1) * CHUNK_S - time.monotonic()))

    async def _append(self, chunk: np.ndarray) -> None:
        await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16_bytes(chunk)).decode()})

    async def wait_for(self, kind: str | tuple[str, ...], timeout_s: float = 120.0, after: int = 0, **match) -> dict:
        """The first event of type `kind` (or of any of these types; at index >= `after`) whose fields equal `match`."""
        kinds = (kind,) if isinstance(kind, str) else kind

        def found():
            return next((e for e in self.events[after:] if e["type"] in kinds
                         and all(e.get(k) == v for k, v in match.items())), None)

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: found() is not None), timeout_s)
            return found()

    async def next_reply(self, timeout_s: float = 180.0) -> ReplyPlayback:
        """The next reply (in the order they were created) once it is done."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(
                lambda: len(self.replies) > self._taken and list(self.replies.values())[self._taken].status), timeout_s)
        reply = list(self.replies.values())[self._taken]
        self._taken += 1
        return reply

    def errors(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "error"]

    async def _read(self) -> None:
        async for message in self.ws:
            now = time.monotonic()
            event = json.loads(message)
            event["_at"] = now
            self._track(event, now)
            async with self._arrived:
                self.events.append(event)
                self._arrived.notify_all()

    def _track(self, event: dict, now: float) -> None:
        kind = event["type"]
        if kind == "response.created":
            self.replies[event["response"]["id"]] = ReplyPlayback(event["response"]["id"])
        elif kind == "response.output_item.added":
            self.replies[event["response_id"]].item_id = event["item"]["id"]
        elif kind == "response.output_audio.delta":
            self.replies[event["response_id"]].chunks.append((now, np.frombuffer(base64.b64decode(event["delta"]), "<i2")))
        elif kind == "response.output_audio_transcript.delta":
            self.replies[event["response_id"]].transcript.append(event["delta"])
        elif kind == "response.done":
            reply = self.replies[event["response"]["id"]]
            reply.status, reply.done_at = event["response"]["status"], now
