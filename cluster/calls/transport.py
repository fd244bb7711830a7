"""What every call protocol does with its WebSocket, written once: receiving within limits, sending JSON, the
reply's audio encoders, the call's background tasks and teardown. Realtime and telephony differ only in what their
messages mean (cluster.api.realtime, cluster.api.telephony)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel
from starlette.websockets import WebSocket, WebSocketDisconnect

from cluster.calls.audio import LineFormat, OutboundAudio
from cluster.calls.events import ReplyFinished


@dataclass(frozen=True)
class BadMessage:
    """A message the protocol cannot read; the call goes on. `code` and `message` are fit for the client."""

    code: str
    message: str


class CallTransport:
    def __init__(self, websocket: WebSocket, max_message_bytes: int):
        self.websocket = websocket
        self.max_message_bytes = max_message_bytes
        self.tasks = CallTasks()  # the call's writer, pacer, watchdog

    async def receive(self) -> dict | BadMessage | None:
        """The next JSON object, a `BadMessage` for one that is not, or None once the far end has gone."""
        try:
            received = await self.websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if received["type"] == "websocket.disconnect":
            return None
        text = received.get("text")
        if text is None:
            return BadMessage("invalid_event", "binary frames are not part of this protocol: send JSON text")
        if len(text) > self.max_message_bytes:
            return BadMessage("message_too_large", f"a message may hold at most {self.max_message_bytes} bytes")
        try:
            message = json.loads(text)
        except json.JSONDecodeError as error:
            return BadMessage("invalid_json", f"the message is not JSON: {error.msg} at {error.pos}")
        if not isinstance(message, dict):
            return BadMessage("invalid_event", "a message is a JSON object")
        return message

    async def send(self, message: dict | BaseModel) -> None:
        if isinstance(message, BaseModel):
            text = message.model_dump_json()
        else:
            text = json.dumps(message, separators=(",", ":"))
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # gone: the reader ends the call
            await self.websocket.send_text(text)

    async def teardown(self, call) -> None:
        """The call is over: the session closes (every slot freed, what was heard committed), then its tasks stop
        and the socket closes. `call`: the CallSession, if the call got that far."""
        if call is not None:
            await call.close()
        await self.tasks.cancel_all()
        await self.close()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        with contextlib.suppress(Exception):
            await self.websocket.close(code=code, reason=reason)


class ReplyEncoders:
    """One encoder per reply, in the line format the reply started in. An interrupted reply's tail is never sent."""

    def __init__(self) -> None:
        self._encoders: dict[str, OutboundAudio] = {}

    def start(self, reply_id: str, line: LineFormat) -> None:
        self._encoders[reply_id] = OutboundAudio(line)

    def encode(self, reply_id: str, audio: np.ndarray) -> bytes:
        return self._encoders[reply_id].encode(audio)

    def finish(self, event: ReplyFinished) -> bytes:
        encoder = self._encoders.pop(event.reply_id)
        return encoder.flush() if event.outcome == "completed" else b""


class CallTasks:
    """Background tasks of one call: kept while they run, all cancelled when the call ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            await cancel_quietly(task)


async def cancel_quietly(task: asyncio.Task | None) -> None:
    """Cancel and wait: its cancellation and its errors (reported where it ran) end here."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
