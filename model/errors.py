"""The project's typed errors. Every layer raises these; the HTTP API maps them to answers by class alone
(`cluster/api/errors.py`), so none carries an HTTP status.

- `CallerError`: the caller's mistake (bad audio, bad request, unknown id, over a limit). The API answers with a
  4xx, the error's `code` and its message, which must name the problem and carry nothing internal. The cluster's
  own caller errors (tenants, API keys, HTTP media) are in `cluster/errors.py`.
- `Unavailable`: nobody's fault, try again shortly (every slot taken, a stage or Redis down): the API answers 503
  with Retry-After. `retryable` errors say so in the `error` event that ends a failed stream.
- Anything else (including `InternalError` and exceptions of other libraries) is an internal failure: the API
  answers 500 with code `internal_error` and the request id, and logs the traceback on the server.

`InvalidInput` also subclasses ValueError, as the input checks it replaces did.
"""

from __future__ import annotations


class ChromaError(Exception):
    """Base of the errors raised on purpose. `code` names the kind for clients; `message` is for people;
    `retryable`: the same request may succeed later."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Exceptions pickle as cls(*args), which subclasses with other signatures cannot take; Ray ships errors
        # between replicas by pickling them.
        return _rebuild, (type(self), self.message, dict(self.__dict__))


def _rebuild(cls: type[ChromaError], message: str, state: dict) -> ChromaError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class CallerError(ChromaError):
    code = "invalid_request"


class InvalidInput(CallerError, ValueError):
    """A request, conversation or text the stack cannot take as given."""


class AudioError(InvalidInput):
    """Audio that cannot be used (corrupt, empty, wrong format or rate); the message names the problem."""

    code = "invalid_audio"


class NotFound(CallerError, KeyError):
    """An unknown id, or one that belongs to another tenant (callers must not learn which)."""

    code = "not_found"

    def __init__(self, kind: str, id: str):
        super().__init__(f"{kind} {id!r} not found")
        self.kind = kind
        self.id = id


class Conflict(CallerError):
    code = "version_conflict"


class Unavailable(ChromaError):
    """Transient: the caller should retry after a moment."""

    code = "unavailable"
    retryable = True


class CapacityError(Unavailable):
    """Every slot (and queue place) is taken: refuse the turn rather than slow every live call down."""

    code = "over_capacity"


class StageUnavailable(Unavailable):
    """A stage has no ready replica (it died and is restarting, or fails its health checks): new turns are
    refused at once instead of waiting for it."""

    code = "stage_unavailable"


class StageFailed(Unavailable):
    """A stage died (`died`: its replica is gone) or failed while it served this request; `stage` names it. The
    turn is lost, the session is not."""

    code = "stage_failed"

    def __init__(self, stage: str, died: bool = False):
        super().__init__(f"the {stage} stage {'went down' if died else 'failed'} during the request; retry it")
        self.stage, self.died = stage, died


class StateUnavailable(Unavailable):
    code = "state_unavailable"


class InternalError(ChromaError):
    """A failure of the stack itself (a broken checkpoint, an engine or channel failure)."""
