"""Typed errors: which HTTP status each class answers with (cluster/api/errors.py, the only place that says), and
errors crossing replicas as the class they were raised as."""

from __future__ import annotations

import pickle

import pytest

import cluster.pipeline.history  # noqa: F401 (defines error classes)
import cluster.state.store  # noqa: F401
import model.reasoner.base  # noqa: F401
from cluster.api.errors import RETRY_LATER, STATUSES, http_status
from cluster.errors import TenantLimit, TooLarge
from model.errors import CallerError, ChromaError, NotFound, StageFailed, Unavailable


def _subclasses(cls: type) -> list[type]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


def test_only_caller_errors_answer_4xx():
    """Every error class defined anywhere in the project, including those that set no status of their own."""
    for kind in _subclasses(ChromaError):
        status = http_status(kind.__new__(kind))
        if issubclass(kind, CallerError):
            assert 400 <= status < 500, kind
        else:
            assert status == (503 if issubclass(kind, Unavailable) else 500), kind
    assert http_status(ValueError("not ours")) == 500
    assert http_status(TenantLimit("over")) == 429 and isinstance(TenantLimit("over"), RETRY_LATER)


def test_the_table_lists_the_most_derived_classes_first():
    kinds = [kind for kind, _ in STATUSES]
    for n, kind in enumerate(kinds):
        assert not any(issubclass(kind, earlier) for earlier in kinds[:n]), f"{kind.__name__} is never reached"


@pytest.mark.parametrize("error", [
    TenantLimit("tenant 'acme' is at its limit"), TooLarge("too long", code="audio_too_long"), NotFound("voice", "v1"),
    StageFailed("Codec", died=True),
])
def test_errors_pickle_as_their_own_class(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.__dict__ == error.__dict__
    assert (str(copy), copy.code, copy.retryable, http_status(copy)) == (str(error), error.code, error.retryable,
                                                                         http_status(error))
