"""The carrier's side of a telephony media stream (Twilio Media Streams; Telnyx with `dialect="telnyx"`), played
over `websockets` from the carriers' documented message shapes, for the tests, the benchmark and Locust.

It sends the caller's audio as 20 ms G.711 frames in real time and plays what the server sends on a simulated
8 kHz clock, in order: a mark is echoed once the audio before it has played (or at once, after a `clear`). It
records what a real line would show: the largest lead of unplayed audio the server queued, gaps in playback
(underruns), voice-to-voice latency and barge-in to `clear`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import websockets

from cluster.clients.realtime import speech_end, websocket_url
from model.processing.audio import encode_alaw, encode_mulaw, resample

LINE_RATE = 8000
FRAME = 160  # 20 ms of G.711
GONE = (websockets.ConnectionClosed, OSError, RuntimeError)  # the server hung up first


@dataclass
class Received:
    """What the server sent, as the carrier saw it."""

    media: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival, payload)
    marks: list[str] = field(default_factory=list)  # names, in the order they were sent to us
    echoed: list[tuple[float, str]] = field(default_factory=list)  # marks we sent back, with when
    clears: list[float] = field(default_factory=list)
    max_lead_ms: float = 0.0
    underruns: int = 0
    stream_ids: set[str] = field(default_factory=set)


class CarrierCall:
    """`async with CarrierCall(url, parameters) as call:` then `say`, `wait`, `hang_up`."""

    def __init__(self, url: str, parameters: dict, dialect: str = "twilio", encoding: str = "PCMU"):
        self.url = websocket_url(url, f"/v1/telephony/{dialect}")
        self.parameters, self.dialect, self.encoding = parameters, dialect, encoding
        self.stream_id = ("MZ" if dialect == "twilio" else "") + uuid.uuid4().hex
        self.received = Received()
        self.speech_ended_at: float | None = None
        self.closed: asyncio.Event = asyncio.Event()
        self.close_code: int | None = None
        self._queue: list[tuple[str, object]] = []  # ("audio", bytes) / ("mark", name) not yet played
        self._queued_ms = 0.0
        self._playing_until = 0.0  # when the audio queued so far will have played
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []

    @property
    def stream_key(self) -> str:
        return "streamSid" if self.dialect == "twilio" else "stream_id"

    async def __aenter__(self) -> CarrierCall:
        self.ws = await websockets.connect(self.url, max_size=None)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._play())]
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        start = {"accountSid": "AC" + "0" * 32, "callSid": "CA" + uuid.uuid4().hex, "tracks": ["inbound"],
                 "customParameters": self.parameters,
                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
        if self.dialect == "telnyx":
            start = {"call_control_id": "v3:" + uuid.uuid4().hex, "custom_parameters": self.parameters,
                     "media_format": {"encoding": self.encoding, "sample_rate": 8000, "channels": 1}}
        await self.send({"event": "start", "sequenceNumber": "1", self.stream_key: self.stream_id, "start": start})
        return self

    async def __aexit__(self, *exc) -> None:
        await self.hang_up()

    async def send(self, message: dict) -> None:
        await self.ws.send(json.dumps(message))

    async def say(self, audio: np.ndarray, rate: int, trailing_silence_s: float = 0.0) -> None:
        """The caller's speech as 20 ms frames in real time; `speech_ended_at` is when its last voiced sample was due."""
        speech = resample(audio, rate, LINE_RATE)
        line = np.concatenate([speech, np.zeros(int(trailing_silence_s * LINE_RATE), np.float32)])
        data = (encode_mulaw if self.encoding == "PCMU" else encode_alaw)(line)
        started = time.monotonic()
        self.speech_ended_at = speech_end(started, speech, LINE_RATE) or self.speech_ended_at
        for n, i in enumerate(range(0, len(data), FRAME)):
            await self.send({"event": "media", self.stream_key: self.stream_id, "media": {
                "track": "inbound", "chunk": str(n), "timestamp": str(n * 20),
                "payload": base64.b64encode(data[i:i + FRAME]).decode()}})
            await asyncio.sleep(max(0.0, started + (n + 1) * 0.02 - time.monotonic()))

    async def hang_up(self) -> None:
        if not self.closed.is_set():
            with contextlib.suppress(*GONE):
                await self.send({"event": "stop", self.stream_key: self.stream_id})
            with contextlib.suppress(*GONE):
                await self.ws.close()
        for task in self._tasks:
            task.cancel()

    async def wait(self, predicate, timeout_s: float = 120.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.received)), timeout_s)

    def audio(self) -> bytes:
        return b"".join(payload for _, payload in self.received.media)

    async def reply_over(self, quiet_s: float = 1.5, timeout_s: float = 180.0) -> None:
        """Until a reply has come and gone: media arrived, has played, and none came for `quiet_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            media = self.received.media
            if media and time.monotonic() - media[-1][0] > quiet_s and not self._queue:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no reply ended within {timeout_s:g} s")

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                await self._on_message(json.loads(text), time.monotonic())
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    async def _on_message(self, message: dict, now: float) -> None:
        received = self.received
        async with self._changed:
            if (stream := message.get(self.stream_key)) is not None:
                received.stream_ids.add(stream)
            kind = message.get("event")
            if kind == "media":
                payload = base64.b64decode(message["media"]["payload"])
                received.media.append((now, payload))
                if self._queued_ms and now > self._playing_until + 0.005:
                    received.underruns += 1  # the line went quiet before this arrived
                self._playing_until = max(self._playing_until, now) + len(payload) / LINE_RATE
                self._queue.append(("audio", payload))
                self._queued_ms += len(payload) / 8
                received.max_lead_ms = max(received.max_lead_ms, self._queued_ms)
            elif kind == "mark":
                received.marks.append(message["mark"]["name"])
                self._queue.append(("mark", message["mark"]["name"]))
            elif kind == "clear":
                # Queued audio is dropped; its marks come back at once, as the carrier does.
                received.clears.append(now)
                marks = [item for kind_, item in self._queue if kind_ == "mark"]
                self._queue, self._queued_ms, self._playing_until = [], 0.0, now
                for name in marks:
                    await self._echo(name, now)
            self._changed.notify_all()

    async def _play(self) -> None:
        """The line's playback clock: 8 samples a millisecond, in order."""
        tick = 0.01
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            async with self._changed:
                budget = tick * LINE_RATE  # samples playable this tick
                while self._queue and budget > 0:
                    kind, item = self._queue[0]
                    if kind == "mark":
                        self._queue.pop(0)
                        await self._echo(item, now)
                        continue
                    played = int(min(budget, len(item)))
                    budget -= played
                    self._queued_ms -= played / 8
                    if played == len(item):
                        self._queue.pop(0)
                    else:
                        self._queue[0] = ("audio", item[played:])
                if not self._queue:
                    self._queued_ms = 0.0
                self._changed.notify_all()

    async def _echo(self, name: str, now: float) -> None:
        self.received.echoed.append((now, name))
        with contextlib.suppress(*GONE):
            await self.send({"event": "mark", self.stream_key: self.stream_id, "mark": {"name": name}})
