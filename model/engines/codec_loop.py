"""`CodecLoop`: the one stepping loop around a `CodecEngine`, shared by the Codec deployment and the one-process
backend.

The engine is not thread-safe and its work is model math, so every call into it (voice encoding, open, push,
step, close, cancel) runs in order on one worker thread of its own: no event loop ever runs a decode. One
stepping task per loop decodes the ready chunks of every live reply in one batched forward and hands each reply
its own audio; it waits a few milliseconds after new frames arrive, so the frames of one speech step (which
steps all its turns together) are decoded in one batch rather than one turn at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from model.chroma.turn import GeneratedFrame, ReplyChunk, VoicePrompt
from model.engines.codec import CodecEngine, CodecStats
from model.engines.realtime import Headroom

BATCH_WINDOW_S = 0.003  # against 160 ms of audio per chunk


class CodecLoop:
    def __init__(self, engine: CodecEngine):
        self.engine = engine
        self.frame_size = engine.config.audio_frame_freq
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec-engine")
        self._replies: dict[str, asyncio.Queue] = {}
        self._stepper: asyncio.Task | None = None
        self._frames_arrived = asyncio.Event()
        self._worker.submit(engine.calibrate).result()  # before the replica reports ready, on the stepping thread

    async def _on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def encode_voice(self, transcript_ids: torch.Tensor, audio_24k: torch.Tensor, num_samples: int) -> VoicePrompt:
        return await self._on_worker(self.engine.encode_voice, transcript_ids, audio_24k, num_samples)

    async def decode(self, turn_id: str, groups: AsyncIterator[list[GeneratedFrame]]) -> AsyncIterator[ReplyChunk]:
        """A reply's text and audio as its frame groups arrive. `groups` is iterated only once a codec stream is
        open (CapacityError when none is free), and closed however the reply ends, which stops the stages
        upstream; leaving early drops the stream."""
        try:
            await self._on_worker(self.engine.open_stream, turn_id)
        except asyncio.CancelledError:  # the open may run anyway: the drop queued after it closes it again
            self._worker.submit(self._drop, turn_id)
            raise
        queue = self._replies[turn_id] = asyncio.Queue()
        feeder = asyncio.create_task(self._feed(turn_id, groups, queue))
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.create_task(self._step_while_replies())
        try:
            while (chunk := await queue.get()) is not None:
                if isinstance(chunk, BaseException):
                    raise chunk
                yield chunk
        finally:
            # No awaits: this also runs while the consumer's task is being cancelled.
            feeder.cancel()
            self._replies.pop(turn_id, None)
            self._frames_arrived.set()  # the stepper stops once no reply is left
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                self._worker.submit(self._drop, turn_id)

    def stats(self) -> CodecStats:
        return self.engine.stats()

    def headroom(self) -> Headroom:
        """The replies this engine decodes at once in real time. Also queues a re-probe of its curve on the worker,
        which runs one where it is due: the stages' readiness is read every fraction of a second, whether replies
        run or not. Not waited for, so a reading of the stages never waits for a decode."""
        self._worker.submit(self.engine.reprobe)
        return self.engine.realtime.headroom()

    async def check(self) -> None:
        """Returns once the worker thread has run a no-op (after the work queued before it); raises once closed.
        A wedged worker never returns: callers bound this with a timeout."""
        await self._on_worker(int)

    async def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def _feed(self, turn_id: str, groups: AsyncIterator[list[GeneratedFrame]], queue: asyncio.Queue) -> None:
        try:
            frames_in = 0
            async with contextlib.aclosing(groups):
                async for group in groups:
                    for frame in group:
                        if frame.text_tokens:
                            queue.put_nowait(ReplyChunk(frame.text_tokens, None, 0, text_at_frame=frames_in))
                        frames_in += frame.codes is not None
                    codes = [frame.codes for frame in group if frame.codes is not None]
                    if codes:
                        await self._on_worker(self.engine.push, turn_id, torch.tensor(codes))
                        self._frames_arrived.set()
            # Runs after every step queued before it, whose chunks the stepper hands out first.
            tail = await self._on_worker(self.engine.close, turn_id)
            if tail is not None and tail.numel():
                queue.put_nowait(self._chunk(tail))
            queue.put_nowait(None)
        except Exception as error:  # a failed upstream stage fails this reply only
            queue.put_nowait(error)

    async def _step_while_replies(self) -> None:
        while self._replies:
            decoded = await self._on_worker(self.engine.step)
            for turn_id, pcm in decoded.items():
                if (queue := self._replies.get(turn_id)) is not None:
                    queue.put_nowait(self._chunk(pcm))
            if not decoded:
                await self._frames_arrived.wait()
                self._frames_arrived.clear()
                await asyncio.sleep(BATCH_WINDOW_S)

    def _chunk(self, pcm: torch.Tensor) -> ReplyChunk:
        return ReplyChunk([], pcm.numpy(), pcm.numel() // self.frame_size)

    def _drop(self, turn_id: str) -> None:
        with contextlib.suppress(KeyError):  # already closed when the reply ran to its end
            self.engine.cancel(turn_id)
