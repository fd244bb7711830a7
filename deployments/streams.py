"""Handle calls between the stages. Streams start when first iterated and are cancelled when left early; a
failed stage's error is handed on as the typed error it raised (never a Ray traceback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from model.errors import ChromaError, InternalError


async def relay(start: Callable[[], DeploymentResponseGenerator], stage: str) -> AsyncIterator:
    """Items of the streaming call `start()` makes. The call is made only once this is iterated, so a stage that
    refuses a turn before consuming its upstream never starts the upstream at all."""
    stream = start()
    try:
        async for item in stream:
            yield item
    except RayTaskError as failure:
        raise stage_error(failure, stage) from None
    finally:
        stream.cancel()  # no-op once the stream is done; otherwise the stage stops (and cancels its own upstream)


async def result(response: DeploymentResponse, stage: str):
    """The result of a unary handle call, with the same error handling as `relay`."""
    try:
        return await response
    except RayTaskError as failure:
        raise stage_error(failure, stage) from None


def stage_error(failure: RayTaskError, stage: str) -> Exception:
    """What a stage raised, as the typed error it was; an untyped failure becomes an InternalError naming the
    stage (its traceback stays in that replica's log)."""
    cause = failure.cause
    if isinstance(cause, ChromaError):
        return cause
    return InternalError(f"the {stage} stage failed")
