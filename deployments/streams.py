"""Handle calls between the stages. Streams start when first iterated and are cancelled when left early; a
failed stage's error is handed on as the typed error it raised, and a replica that died mid-call as StageFailed
(never a Ray traceback or actor repr). A stage whose caller died stops that caller's streams (`CallerWatch`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, RayError, RayTaskError
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from model.engines.realtime import Headroom
from model.errors import ChromaError, StageFailed

log = logging.getLogger(__name__)


async def relay(start: Callable[[], DeploymentResponseGenerator], stage: str) -> AsyncIterator:
    """Items of the streaming call `start()` makes. The call is made only once this is iterated, so a stage that
    refuses a turn before consuming its upstream never starts the upstream at all."""
    stream = start()
    try:
        async for item in stream:
            yield item
    except RayError as failure:
        raise stage_error(failure, stage) from None
    finally:
        stream.cancel()  # no-op once the stream is done; otherwise the stage stops (and cancels its own upstream)


async def result(response: DeploymentResponse, stage: str):
    """The result of a unary handle call, with the same error handling as `relay`."""
    try:
        return await response
    except RayError as failure:
        raise stage_error(failure, stage) from None


def stage_error(failure: RayError, stage: str) -> Exception:
    """What a stage raised, as the typed error it was. An untyped failure becomes StageFailed naming the stage (its
    traceback stays in that replica's log); any other Ray error means the replica died or could not be reached
    (ActorDiedError, ActorUnavailableError: the call may or may not have run, so nothing is retried)."""
    if not isinstance(failure, RayTaskError):
        return StageFailed(stage, died=True)
    cause = failure.cause
    if isinstance(cause, ChromaError):
        return cause
    return StageFailed(stage)


def this_replica() -> ActorHandle:
    """The calling replica, to hand to the stage it calls (see CallerWatch)."""
    return ray.get_runtime_context().current_actor


def answered_here(headroom: Headroom) -> Headroom:
    """A stage's probe answer, naming the replica that gave it (the Ingress sums its replicas' answers)."""
    return replace(headroom, replica=ray.get_runtime_context().get_actor_id())


class CallerWatch:
    """Cancels this replica's streams whose caller died. Ray does not cancel a streaming call when the replica that
    made it dies, so without this a turn whose Ingress or Codec died would keep its speech slot and its Reasoner
    request generating for nobody until the turn's natural end. One ping per caller replica per `period_s`, for
    all its streams; a caller that is slow or briefly unreachable is not taken for dead."""

    def __init__(self, period_s: float = 1.0, timeout_s: float = 10.0):
        self.period_s, self.timeout_s = period_s, timeout_s
        self._streams: dict[ActorHandle, set[asyncio.Task]] = {}

    @contextlib.contextmanager
    def guard(self, caller: ActorHandle | None):
        """While inside, the current task is cancelled if `caller` dies (None: a driver, not watched)."""
        if caller is None:
            yield
            return
        task = asyncio.current_task()
        tasks = self._streams.setdefault(caller, set())
        if not tasks:
            asyncio.get_running_loop().create_task(self._watch(caller, tasks))
        tasks.add(task)
        try:
            yield
        finally:
            tasks.discard(task)

    async def _watch(self, caller: ActorHandle, tasks: set[asyncio.Task]) -> None:
        try:
            while tasks:
                await asyncio.sleep(self.period_s)
                try:
                    await asyncio.wait_for(caller.__ray_ready__.remote(), self.timeout_s)
                except ActorDiedError:
                    log.warning("a caller replica died: stopping its %d streams", len(tasks))
                    for task in list(tasks):
                        task.cancel()
                    return
                except (TimeoutError, RayError):  # slow, or unreachable for now: look again later
                    continue
        finally:
            if self._streams.get(caller) is tasks:
                del self._streams[caller]
