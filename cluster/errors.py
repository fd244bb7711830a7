"""The cluster's own caller errors: tenants, their keys, and what an HTTP request may carry. The model raises none of
them; they subclass its `CallerError`, so every layer handles them as any caller mistake (cluster/api/errors.py
says which answer each class gets)."""

from __future__ import annotations

from model.errors import CallerError


class BadRequest(CallerError):
    """A request that cannot be read as sent (a malformed header, a body cut short)."""


class TooLarge(CallerError):
    code = "too_large"


class UnsupportedMediaType(CallerError):
    code = "unsupported_media_type"


class NotAcceptable(CallerError):
    code = "not_acceptable"


class Unauthorized(CallerError):
    code = "unauthorized"


class TenantLimit(CallerError):
    """The tenant already has as many live turns (or calls) as its quota allows."""

    code = "tenant_concurrency_limit"
    retryable = True
