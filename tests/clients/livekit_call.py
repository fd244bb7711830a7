"""Run by the clients' venv (`make clients-venv`), never by the server's: LiveKit Agents 1.8's own OpenAI Realtime
client holds a call on `/v1/realtime`, driven through its public API (a `RealtimeSession`: push_audio,
generate_reply, update_chat_ctx, interrupt, truncate and its events), with no LiveKit room or server. The model is
built by the README's "Connect LiveKit Agents" snippet itself, so the README cannot drift from what works.

    livekit_call.py URL API_KEY VOICE_ID README

plays a call and prints a JSON report of what LiveKit saw: a greeting (`generate_reply()` with nothing said), a
server-VAD turn spoken with espeak-ng, a barge-in over a reply (cut to what was "played", as LiveKit's AgentSession
does), a system and a user message added with `update_chat_ctx` and answered, LiveKit's copy of the history beside the server's,
and every warning LiveKit logged. It exits 0 whatever it saw: the test reads the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from livekit import rtc
from livekit.agents import llm
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from common import RATE, espeak, readme_snippet

SECTION = "Connect LiveKit Agents"
FRAME_SAMPLES = RATE // 50  # 20 ms, as a LiveKit room delivers them
STEP_TIMEOUT_S = 60
SERVER_EVENT = TypeAdapter(RealtimeServerEvent)  # LiveKit builds the SDK's models of the events it handles unchecked


class Captured(logging.Handler):
    """What LiveKit logs at WARNING and up (an event it failed to handle is an ERROR, with its traceback)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage() + (f"\n{self.formatter.formatException(record.exc_info)}" if record.exc_info else "")
        self.records.append({"level": record.levelname, "logger": record.name, "message": message[-2000:]})


def build_model(readme: Path, url: str, api_key: str, voice_id: str):
    os.environ.update(CHROMA_URL=url, CHROMA_API_KEY=api_key, CHROMA_VOICE_ID=voice_id)
    namespace: dict = {}
    exec(compile(readme_snippet(readme, SECTION), f"{readme}:{SECTION}", "exec"), namespace)  # noqa: S102
    return namespace["model"]


@dataclass
class Reply:
    """One generation as LiveKit streams it, played out at real time (a simulated speaker)."""

    response_id: str
    user_initiated: bool
    message_id: str | None = None
    transcript: str = ""
    audio_ms: float = 0.0
    first_audio_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def playing(self) -> bool:
        return self.first_audio_at is not None and (not self.done.is_set() or self.played_ms() < self.audio_ms)

    def played_ms(self) -> int:
        if self.first_audio_at is None:
            return 0
        return int(min(self.audio_ms, 1000 * (time.monotonic() - self.first_audio_at)))

    async def played_out(self) -> None:
        await self.done.wait()
        while self.played_ms() < self.audio_ms:
            await asyncio.sleep(0.05)

    def summary(self) -> dict:
        return {"response_id": self.response_id, "message_id": self.message_id, "user_initiated": self.user_initiated,
                "transcript": self.transcript, "audio_ms": round(self.audio_ms)}


class Call:
    def __init__(self, session):
        self.session = session
        self.replies: list[Reply] = []
        self.new_reply = asyncio.Event()
        self.server_events: list[dict] = []
        self.client_events: list[dict] = []
        self.speech_started = 0
        self.errors: list[str] = []  # LiveKit's error events
        self.invalid_events: list[dict] = []  # server events outside the SDK's set, or failing their model
        self.tasks: set[asyncio.Task] = set()
        self.barge_in: tuple[Reply, int] | None = None  # the reply interrupted, and the ms of it played
        session.on("generation_created", self._on_generation)
        session.on("input_speech_started", self._on_speech_started)
        session.on("openai_server_event_received", self._on_server_event)
        session.on("openai_client_event_queued", self.client_events.append)
        session.on("error", lambda event: self.errors.append(str(event.error)))

    @property
    def session_id(self) -> str | None:
        ids = [e["session"]["id"] for e in self.server_events if e["type"] in ("session.created", "session.updated")]
        return ids[-1] if ids else None

    def _on_server_event(self, event: dict) -> None:
        self.server_events.append(event)
        try:
            SERVER_EVENT.validate_python(event)
        except Exception as error:  # noqa: BLE001
            self.invalid_events.append({"type": event.get("type"), "error": str(error)[:500]})

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_generation(self, event: llm.GenerationCreatedEvent) -> None:
        reply = Reply(event.response_id, event.user_initiated)
        self.replies.append(reply)
        self.new_reply.set()
        self._spawn(self._play(reply, event))

    async def _play(self, reply: Reply, event: llm.GenerationCreatedEvent) -> None:
        async def text(stream) -> None:
            async for delta in stream:
                reply.transcript += delta

        async def audio(stream) -> None:
            async for frame in stream:
                reply.first_audio_at = reply.first_audio_at or time.monotonic()
                reply.audio_ms += 1000 * frame.samples_per_channel / frame.sample_rate

        async for message in event.message_stream:
            reply.message_id = message.message_id
            await asyncio.gather(text(message.text_stream), audio(message.audio_stream))
        reply.done.set()

    def _on_speech_started(self, _event) -> None:
        """What LiveKit's AgentSession does when the caller speaks over its agent: stop playing, cancel the
        generation, and cut the reply to what was played."""
        self.speech_started += 1
        playing = next((r for r in self.replies if r.playing and r.message_id is not None), None)
        if playing is None:
            return
        played = playing.played_ms()
        self.barge_in = (playing, played)
        self.session.interrupt()
        self.session.truncate(message_id=playing.message_id, modalities=["audio"], audio_end_ms=played)

    async def next_reply(self, after: int) -> Reply:
        while len(self.replies) <= after:
            self.new_reply.clear()
            await self.new_reply.wait()
        return self.replies[after]

    async def say(self, pcm: bytes, silence_s: float = 1.5) -> None:
        """Speak at real-time pace in 20 ms frames, then silence (the server's VAD ends the turn in it)."""
        pcm += bytes(2 * int(silence_s * RATE))
        started = time.monotonic()
        for n, at in enumerate(range(0, len(pcm) - 2 * FRAME_SAMPLES + 1, 2 * FRAME_SAMPLES)):
            frame = rtc.AudioFrame(data=pcm[at:at + 2 * FRAME_SAMPLES], sample_rate=RATE, num_channels=1,
                                   samples_per_channel=FRAME_SAMPLES)
            self.session.push_audio(frame)
            await asyncio.sleep(max(0.0, started + (n + 1) * 0.02 - time.monotonic()))


async def server_history(http: aiohttp.ClientSession, url: str, api_key: str, session_id: str) -> list[dict]:
    async with http.get(f"{url}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {api_key}"}) as reply:
        reply.raise_for_status()
        return (await reply.json())["history"]


def livekit_history(session) -> list[dict]:
    return [{"id": item.id, "role": getattr(item, "role", item.type)} for item in session.chat_ctx.items]


async def step(report: dict, name: str, coro) -> None:
    """Run one part of the call; its outcome (or what went wrong) goes into the report."""
    try:
        report[name] = await asyncio.wait_for(coro, STEP_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 (the report says what failed, the test asserts on it)
        report[name] = {"error": f"{type(error).__name__}: {error}"}


async def run(url: str, api_key: str, voice_id: str, readme: Path) -> dict:
    model = build_model(readme, url, api_key, voice_id)
    session = model.session()
    call = Call(session)
    report: dict = {}
    http = aiohttp.ClientSession()
    try:
        async def greeting() -> dict:
            at = len(call.replies)
            generation = await session.generate_reply()  # nothing said yet
            reply = await call.next_reply(at)
            await reply.played_out()
            return {**reply.summary(), "created": generation.response_id == reply.response_id}

        async def voice_turn() -> dict:
            at = len(call.replies)
            await call.say(espeak("What is the weather like in Paris today?"))
            reply = await call.next_reply(at)
            await reply.played_out()
            return reply.summary()

        async def barge_in() -> dict:
            at, heard = len(call.replies), call.speech_started
            await call.say(espeak("Tell me a long story about the sea."), silence_s=0.5)
            reply = await call.next_reply(at)
            while reply.first_audio_at is None:
                await asyncio.sleep(0.01)
            await call.say(espeak("Stop, stop, wait a moment please."))  # over the reply, as it plays
            await reply.done.wait()
            answer = await call.next_reply(at + 1)
            await answer.played_out()
            done = next(e for e in call.server_events
                        if e["type"] == "response.done" and e["response"]["id"] == reply.response_id)
            truncated = [e for e in call.server_events
                         if e["type"] == "conversation.item.truncated" and e["item_id"] == reply.message_id]
            interrupted, played = call.barge_in if call.barge_in else (None, None)
            return {**reply.summary(), "speech_started": call.speech_started - heard,
                    "interrupted": interrupted is reply, "played_ms": played,
                    "status": done["response"]["status"], "status_details": done["response"].get("status_details"),
                    "truncated_ms": truncated[-1]["audio_end_ms"] if truncated else None, "answer": answer.summary()}

        async def text_message() -> dict:
            chat_ctx = session.chat_ctx.copy()
            note = chat_ctx.add_message(role="system", content="The caller's name is Ada.")
            message = chat_ctx.add_message(role="user", content="Please say something about the sea.")
            await session.update_chat_ctx(chat_ctx)  # waits for the server's conversation.item.added
            at = len(call.replies)
            generation = await session.generate_reply()
            reply = await call.next_reply(at)
            await reply.played_out()
            return {**reply.summary(), "user_item": message.id, "system_item": note.id,
                    "created": generation.response_id == reply.response_id}

        async def histories() -> dict:
            """The server commits a reply once it was played: wait until both sides hold the same items."""
            ours = []
            for _ in range(100):
                ours = await server_history(http, url, api_key, call.session_id)
                if [m["id"] for m in ours] == [i["id"] for i in livekit_history(session)]:
                    break
                await asyncio.sleep(0.2)
            return {"livekit": livekit_history(session),
                    "server": [{"id": m["id"], "role": m["role"], "text": m.get("text")} for m in ours]}

        await step(report, "greeting", greeting())
        await step(report, "voice_turn", voice_turn())
        await step(report, "barge_in", barge_in())
        await step(report, "text_message", text_message())
        await step(report, "history", histories())
        report["session_id"] = call.session_id
        updates = [e["session"] for e in call.client_events if e["type"] == "session.update"]
        report["voice"] = updates[0]["audio"]["output"]["voice"] if updates else None  # what LiveKit asked for
        report["event_types"] = sorted({e["type"] for e in call.server_events})
        report["invalid_events"] = call.invalid_events
        report["errors"] = call.errors
        report["server_errors"] = [e["error"] for e in call.server_events if e["type"] == "error"]
    finally:
        await session.aclose()
        await model.aclose()
        await http.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("api_key")
    parser.add_argument("voice_id")
    parser.add_argument("readme", type=Path)
    args = parser.parse_args()
    captured = Captured()
    captured.setFormatter(logging.Formatter())
    logging.getLogger("livekit").addHandler(captured)
    started = time.monotonic()
    report = asyncio.run(run(args.url.rstrip("/"), args.api_key, args.voice_id, args.readme))
    report["log"] = captured.records
    report["seconds"] = round(time.monotonic() - started, 1)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
