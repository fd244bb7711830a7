"""Handle calls between the stages. Streams start when first iterated and are cancelled when left early; a
failed stage's error is handed on as the typed error it raised, and a replica that died mid-call as StageFailed
(never a Ray traceback or actor repr)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from ray.exceptions import RayError, RayTaskError
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from model.errors import ChromaError, StageFailed


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
