"""Run by the clients' venv (`make clients-venv`), never by the server's: one call on /v1/realtime held by pipecat
1.14's `OpenAIRealtimeLLMService`, built by the "Connect pipecat" block of README.md (executed as written), in a
pipeline shaped like pipecat's examples: an input transport (the caller's microphone: espeak-ng speech at 24 kHz,
20 ms frames at real-time pace, silence between), the user aggregator, the service, an output transport that plays
the reply on a real-time clock (pipecat's own BaseOutputTransport, so BotStarted/StoppedSpeaking and interruptions
are pipecat's), the assistant aggregator.

The call: an `LLMRunFrame` at the start, as pipecat's examples send one (a greeting), a spoken question (a server-VAD
turn and a spoken reply, and the caller's transcript in pipecat's context), a second question talked over as soon as
its reply plays (pipecat truncates it; the reply is cancelled), a text message (`LLMMessagesAppendFrame`, run_llm),
which pipecat sends as a `system` item. It
prints a JSON report: what pipecat's frames and event handlers showed, what went over the wire (websockets' own
debug log, both directions), pipecat's log problems, and `failures` (the process exits 1 if there are any).

    python tests/clients/pipecat_call.py --url http://HOST:PORT --key KEY --voice VOICE_ID --readme README.md
"""

from __future__ import annotations

import os

# websockets logs every frame at DEBUG, elided past this many characters: enough for every event but audio.
os.environ.setdefault("WEBSOCKETS_MAX_LOG_SIZE", "20000")

import argparse  # noqa: E402
import ast  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from loguru import logger  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    OutputAudioRawFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.services.openai.realtime import events  # noqa: E402
from pipecat.transports.base_input import BaseInputTransport  # noqa: E402
from pipecat.transports.base_output import BaseOutputTransport  # noqa: E402
from pipecat.transports.base_transport import TransportParams  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from common import RATE, espeak, readme_snippet  # noqa: E402

FRAME_BYTES = RATE * 2 // 50  # 20 ms of PCM16 mono
QUESTION = "Hello, can you tell me what the weather is like today?"
SECOND = "And what about tomorrow, will it rain in the afternoon?"
INTERRUPTION = "Wait, wait, please stop for a moment."
TEXT = "Please say something short about the sea."
SECTION = "Connect pipecat"
# What pipecat logs when it cannot take an event: an unknown type (older releases), one that fails its model, an
# error event it treats as fatal, a task that died.
LOG_PROBLEM = re.compile(r"unknown|parse|validation|invalid|Error: |exception|Traceback", re.IGNORECASE)


class Wire(logging.Handler):
    """The WebSocket's frames as websockets logs them: `< TEXT '{...}' [n bytes]` in, `> TEXT ...` out."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.received: list[dict] = []  # full events, audio deltas elided to their type
        self.sent: list[dict] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        match = re.match(r"([<>]) TEXT (.*) \[[^\]]*bytes[^\]]*\]$", line, re.DOTALL)
        if not match:
            return
        direction, payload = match.groups()
        try:
            event = json.loads(ast.literal_eval(payload))
        except (ValueError, SyntaxError):  # elided: an audio append or delta
            kind = re.search(r'"type"\s*:\s*"([^"]+)"', payload)
            event = {"type": kind.group(1) if kind else "?", "elided": True}
        event["_at"] = time.monotonic()
        (self.received if direction == "<" else self.sent).append(event)
        self.changed.set()

    def of(self, kind: str, after: int = 0) -> list[dict]:
        return [e for e in self.received[after:] if e["type"] == kind]

    async def wait_for(self, kind: str, after: int = 0, timeout_s: float = 60.0, **fields) -> dict:
        def found():
            return next((e for e in self.received[after:]
                         if e["type"] == kind and all(_field(e, k) == v for k, v in fields.items())), None)
        return await until(self.changed, found, timeout_s, f"{kind} {fields or ''}")


async def until(changed: asyncio.Event, found, timeout_s: float, what: str):
    """What `found()` returns once it is truthy, checked each time `changed` is set."""
    deadline = time.monotonic() + timeout_s
    while not (result := found()):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {what} within {timeout_s:g} s")
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), left)
        except asyncio.TimeoutError:
            pass
    return result


def _field(event: dict, path: str):
    for key in path.split("__"):
        event = event.get(key) if isinstance(event, dict) else None
    return event


class Microphone(BaseInputTransport):
    """The caller's microphone: what `say` queued, else silence, one 20 ms frame every 20 ms."""

    def __init__(self):
        super().__init__(TransportParams(audio_in_enabled=True, audio_in_sample_rate=RATE))
        self._pending = bytearray()
        self._drained = asyncio.Event()
        self._task = None

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        self._task = self.create_task(self._stream())

    async def stop(self, frame: EndFrame):
        await self._halt()
        await super().stop(frame)

    async def cancel(self, frame):
        await self._halt()
        await super().cancel(frame)

    async def _halt(self):
        if self._task:
            await self.cancel_task(self._task)
            self._task = None

    async def say(self, pcm: bytes) -> None:
        """Queue speech and return once the last of it has been spoken."""
        self._drained.clear()
        self._pending.extend(pcm)
        await self._drained.wait()

    async def _stream(self):
        next_at = time.monotonic()
        while True:
            chunk = bytes(self._pending[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\0")
            del self._pending[:FRAME_BYTES]
            if not self._pending:
                self._drained.set()
            await self.push_audio_frame(InputAudioRawFrame(audio=chunk, sample_rate=RATE, num_channels=1))
            next_at += 0.02
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


class Speaker(BaseOutputTransport):
    """The caller's loudspeaker: plays each chunk pipecat writes on a real-time clock, as a sound card would."""

    def __init__(self):
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=RATE))
        self.played_bytes = 0

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        self.played_bytes += len(frame.audio)
        await asyncio.sleep(len(frame.audio) / (2 * frame.sample_rate * frame.num_channels))
        return True


class Frames(BaseObserver):
    """What pipecat's frames showed, in order: the replies as its service spoke them (from LLMFullResponseStart), the
    caller's transcripts, the turns, the bot's playback, errors."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm
        self.seen: set[int] = set()
        self.spoken: list[dict] = []  # one per reply: what the service pushed from its LLMFullResponseStartFrame on
        self.counts: dict[str, int] = {}
        self.user_transcripts: list[str] = []
        self.errors: list[str] = []
        self.bot_speaking = False
        self.changed = asyncio.Event()

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if frame.id in self.seen:
            return
        self.seen.add(frame.id)
        name = type(frame).__name__
        tracked = (LLMFullResponseStartFrame, BotStartedSpeakingFrame, BotStoppedSpeakingFrame, InterruptionFrame,
                   UserStartedSpeakingFrame, UserStoppedSpeakingFrame, TTSStartedFrame, TTSStoppedFrame,
                   TTSAudioRawFrame, TTSTextFrame, TranscriptionFrame, InterimTranscriptionFrame, ErrorFrame)
        if not isinstance(frame, tracked):
            return
        self.counts[name] = self.counts.get(name, 0) + 1
        if isinstance(frame, LLMFullResponseStartFrame) and data.source is self.llm:
            if not self.spoken or self.spoken[-1]["audio_bytes"] or self.spoken[-1]["text"]:
                self.spoken.append({"audio_bytes": 0, "text": "", "started": False, "stopped": False})
        elif isinstance(frame, TTSStartedFrame) and data.source is self.llm and self.spoken:
            self.spoken[-1]["started"] = True
        elif isinstance(frame, TTSStoppedFrame) and data.source is self.llm and self.spoken:
            self.spoken[-1]["stopped"] = True
        elif isinstance(frame, TTSAudioRawFrame) and data.source is self.llm and self.spoken:
            self.spoken[-1]["audio_bytes"] += len(frame.audio)
        elif isinstance(frame, TTSTextFrame) and data.source is self.llm and self.spoken:
            self.spoken[-1]["text"] += frame.text
        elif isinstance(frame, TranscriptionFrame):
            self.user_transcripts.append(frame.text)
        elif isinstance(frame, BotStartedSpeakingFrame):
            self.bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.bot_speaking = False
        elif isinstance(frame, ErrorFrame):
            self.errors.append(f"{frame.error} (fatal={frame.fatal})")
        self.changed.set()

    async def until(self, condition, timeout_s: float, what: str) -> None:
        await until(self.changed, condition, timeout_s, f"pipecat {what}")


async def call(args) -> dict:
    wire = Wire()
    ws_log = logging.getLogger("websockets.client")
    ws_log.setLevel(logging.DEBUG)
    ws_log.addHandler(wire)
    pipecat_log: list[dict] = []
    logger.remove()
    logger.add(lambda m: pipecat_log.append({"level": m.record["level"].name, "text": m.record["message"]}),
               level="DEBUG")
    logger.add(sys.stderr, level="INFO")

    os.environ.update(CHROMA_API_KEY=args.key, CHROMA_VOICE_ID=args.voice,
                      CHROMA_REALTIME_URL=args.url.replace("http", "ws", 1).rstrip("/") + "/v1/realtime")
    scope: dict = {}
    exec(compile(readme_snippet(Path(args.readme), SECTION), f"{args.readme}:{SECTION}", "exec"), scope)
    llm = scope["llm"]

    items: list[dict] = []  # pipecat's on_conversation_item_updated: the items as it settled them

    @llm.event_handler("on_conversation_item_updated")
    async def on_item_updated(service, item_id, item):
        if item is not None:
            items.append({"id": item_id, "role": item.role, "status": item.status})

    microphone, speaker = Microphone(), Speaker()
    user, assistant = LLMContextAggregatorPair(LLMContext())
    worker = PipelineWorker(Pipeline([microphone, user, llm, speaker, assistant]),
                            params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE))
    frames = Frames(llm)
    worker.add_observer(frames)
    speech = {name: espeak(text) for name, text in
              (("question", QUESTION), ("second", SECOND), ("interruption", INTERRUPTION))}
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    steps: dict[str, dict] = {}
    failures: list[str] = []
    try:
        updated = await wire.wait_for("session.updated", timeout_s=30, session__audio__output__voice=args.voice)
        steps["session"] = {"id": updated["session"]["id"], "voice": args.voice,
                            "turn_detection": updated["session"]["audio"]["input"]["turn_detection"]}

        # 0. As pipecat's examples start a call: an LLMRunFrame, which sets up the conversation from the context (the
        # system instruction only) and runs the model: a greeting, with nothing said yet.
        mark, spoken = len(wire.received), len(frames.spoken)
        await worker.queue_frame(LLMRunFrame())
        done = await wire.wait_for("response.done", after=mark, timeout_s=90)
        await frames.until(lambda: not frames.bot_speaking and len(frames.spoken) > spoken, 60, "end of playback")
        steps["greeting"] = {"events": _types(wire, mark), "response": _response(done), "spoken": spoken}

        # 1. A spoken question: a server-VAD turn, a spoken reply, played to its end.
        mark, spoken = len(wire.received), len(frames.spoken)
        await microphone.say(speech["question"])
        done = await wire.wait_for("response.done", after=mark, timeout_s=90)
        await frames.until(lambda: not frames.bot_speaking and len(frames.spoken) > spoken, 60, "end of playback")
        committed = wire.of("input_audio_buffer.committed", mark)[0]
        heard = await wire.wait_for("conversation.item.input_audio_transcription.completed", after=mark,
                                    timeout_s=60, item_id=committed["item_id"])
        await frames.until(lambda: heard["transcript"] in frames.user_transcripts, 10, "transcript of the caller")
        steps["voice_turn"] = {"events": _types(wire, mark), "response": _response(done), "spoken": spoken,
                               "item_id": committed["item_id"], "transcript": heard["transcript"]}

        # 2. A second question, talked over as soon as its reply plays.
        mark, spoken = len(wire.received), len(frames.spoken)
        await microphone.say(speech["second"])
        await frames.until(lambda: frames.bot_speaking and len(frames.spoken) > spoken, 90, "reply playing")
        barge_at = len(wire.received)
        sent_mark = len(wire.sent)
        await microphone.say(speech["interruption"])
        done = await wire.wait_for("response.done", after=mark, timeout_s=60)
        truncate = next((e for e in wire.sent[sent_mark:] if e["type"] == "conversation.item.truncate"), None)
        truncated = truncate and await wire.wait_for("conversation.item.truncated", after=barge_at, timeout_s=30)
        # The turn the interruption itself makes is answered; let it play out.
        created = await wire.wait_for("response.created", after=barge_at, timeout_s=90)
        answer = await wire.wait_for("response.done", after=barge_at, timeout_s=90,
                                     response__id=created["response"]["id"])
        await frames.until(lambda: not frames.bot_speaking, 60, "end of playback")
        steps["barge_in"] = {
            "events": _types(wire, mark),
            "speech_started_during_reply": bool(wire.of("input_audio_buffer.speech_started", barge_at)),
            "response": _response(done), "truncate": _strip(truncate), "truncated": _strip(truncated),
            "pipecat_item": next((i for i in items if i["id"] == _item_of(done)), None),
            "next_response": _response(answer),
        }

        # 3. A text message, pipecat's way: appended to the context, run. The service sends an appended message as a
        # `system` item (the user aggregator takes appends queued at the pipeline's start into the context and
        # never passes them on, so the frame is queued where it reaches the service).
        mark, sent_mark, spoken = len(wire.received), len(wire.sent), len(frames.spoken)
        await llm.queue_frame(LLMMessagesAppendFrame(messages=[{"role": "user", "content": TEXT}], run_llm=True))
        done = await wire.wait_for("response.done", after=mark, timeout_s=90)
        await frames.until(lambda: not frames.bot_speaking and len(frames.spoken) > spoken, 60, "end of playback")
        created = [e for e in wire.sent[sent_mark:] if e["type"] == "conversation.item.create"]
        steps["text"] = {"events": _types(wire, mark), "response": _response(done), "spoken": spoken,
                         "item_create": _strip(created[-1]) if created else None,
                         "item_added": _strip(next((e for e in wire.of("conversation.item.added", mark)
                                                    if e["item"]["role"] == "system"), None))}
    except TimeoutError as error:
        failures.append(str(error))
    finally:
        await worker.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(running, 15)
        except asyncio.TimeoutError:
            await runner.cancel()
            failures.append("pipecat did not end within 15 s of an EndFrame")

    problems = [m for m in pipecat_log if m["level"] in ("ERROR", "CRITICAL")
                or (m["level"] == "WARNING" and LOG_PROBLEM.search(m["text"]))]
    failures += [f"pipecat logged {m['level']}: {m['text'][:300]}" for m in problems]
    failures += [f"pipecat pushed an ErrorFrame: {e}" for e in frames.errors]
    failures += [f"the server sent an error: {e.get('error')}" for e in wire.of("error")]
    # pipecat 1.14 skips what it does not model (older releases raised): the server sends only what it models.
    unmodelled = sorted({e["type"] for e in wire.received if not e.get("elided")
                         and events.parse_server_event(json.dumps(_strip(e))) is None})
    failures += [f"pipecat does not model the server's {kind}" for kind in unmodelled]
    return {
        "failures": failures,
        "steps": steps,
        "pipecat": {"spoken": frames.spoken,
                    "frames": frames.counts, "user_transcripts": frames.user_transcripts,
                    "items": items, "played_bytes": speaker.played_bytes,
                    "log_problems": problems},
        "wire": {"received": _counts(wire.received), "sent": _counts(wire.sent), "transcripts": _transcripts(wire)},
    }


def _types(wire: Wire, after: int) -> list[str]:
    return [e["type"] for e in wire.received[after:] if e["type"] not in
            ("response.output_audio.delta", "response.output_audio_transcript.delta")]


def _strip(event: dict | None) -> dict | None:
    return None if event is None else {k: v for k, v in event.items() if k != "_at"}


def _item_of(done: dict) -> str | None:
    output = done["response"].get("output") or []
    return output[0]["id"] if output else None


def _response(done: dict) -> dict:
    response = done["response"]
    return {"id": response["id"], "status": response["status"], "status_details": response.get("status_details"),
            "item_id": _item_of(done)}


def _transcripts(wire: Wire) -> dict[str, list[str]]:
    """Each response's transcript deltas, by response id."""
    deltas: dict[str, list[str]] = {}
    for e in wire.of("response.output_audio_transcript.delta"):
        deltas.setdefault(e["response_id"], []).append(e["delta"])
    return deltas


def _counts(events: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        counts[e["type"]] = counts.get(e["type"], 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, http://HOST:PORT")
    parser.add_argument("--key", required=True)
    parser.add_argument("--voice", required=True, help="a voice id from /v1/voices")
    parser.add_argument("--readme", required=True, help="README.md, whose 'Connect pipecat' block builds the service")
    report = asyncio.run(call(parser.parse_args()))
    print(json.dumps(report, indent=1))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
