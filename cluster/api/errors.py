"""Error answers: one JSON shape everywhere, status and code by error class, a request id on every response.

`{"error": {"code": "...", "message": "...", "request_id": "req_..."}}`. Which status answers which error is the
one table here (`http_status`): caller mistakes (`CallerError`) answer 4xx (429 `tenant_concurrency_limit` with
Retry-After); `Unavailable` (and Redis being away) answers 503 with Retry-After; anything else is an internal failure: 500 `internal_error`, the traceback in the
server log under the request id, and nothing of it in the body. A stream that fails after it started ends with
the same body as an `error` event (`stream_error`), plus `retryable`.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.api.metrics import ApiMetrics
from cluster.errors import BadRequest, NotAcceptable, TenantLimit, TooLarge, Unauthorized, UnsupportedMediaType
from model.errors import CallerError, ChromaError, Conflict, NotFound, Unavailable

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"

# An error's HTTP status by class, most derived first: the first class it is an instance of answers. Only caller
# mistakes are 4xx; anything not listed is an internal failure (500).
STATUSES: tuple[tuple[type[ChromaError], int], ...] = (
    (BadRequest, 400), (Unauthorized, 401), (NotFound, 404), (NotAcceptable, 406), (Conflict, 409),
    (TooLarge, 413), (UnsupportedMediaType, 415), (TenantLimit, 429), (CallerError, 422), (Unavailable, 503),
)
RETRY_LATER = (TenantLimit, Unavailable)  # answered with Retry-After


def http_status(error: BaseException) -> int:
    return next((status for kind, status in STATUSES if isinstance(error, kind)), 500)


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable kind, e.g. not_found, invalid_audio, over_capacity")
    message: str = Field(description="what was wrong, for people")
    request_id: str | None = Field(None, description="quote it when reporting a problem")
    retryable: bool = Field(False, description="the same request may succeed later (after Retry-After)")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` entries for a route's error statuses."""
    descriptions = {
        400: "Malformed request", 401: "Missing or unknown API key", 404: "Unknown id (or another tenant's)",
        406: "No acceptable reply type",
        409: "The session changed meanwhile, or (context_full) its history fills the Reasoner's context and its "
        "truncation is disabled",
        413: "Body or audio over the limit", 415: "Unsupported media type",
        422: "Invalid request or audio (utterance_too_long: it does not fit the Reasoner's context by itself)",
        429: "The tenant's concurrency quota is used up (tenant_concurrency_limit): retry after Retry-After seconds",
        503: "Over capacity, a stage or the state store unavailable: retry after Retry-After seconds",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


def validation_message(errors: list[dict]) -> str:
    """pydantic / FastAPI validation errors as one line: 'field.path: problem; ...'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict | None = None, retryable: bool = False,
) -> JSONResponse:
    detail = ErrorDetail(code=code, message=message, request_id=request_id(request) or None, retryable=retryable)
    return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status, headers=headers)


STATE_UNAVAILABLE = "the state store is unavailable; retry shortly"


def internal_message(rid: str) -> str:
    """An internal failure says only where to look: its request id, under which it was logged."""
    return f"internal error; quote request id {rid} when reporting it"


def stream_error(error: BaseException, rid: str) -> ErrorBody:
    """The `error` event that ends a stream which failed after it started: the code and message its HTTP answer
    would have carried. Internal failures are logged here, under the request id, and say nothing more."""
    if isinstance(error, (CallerError, Unavailable)):
        detail = ErrorDetail(code=error.code, message=error.message, retryable=error.retryable)
    elif isinstance(error, RedisError):
        log.warning("request %s: Redis unavailable mid-stream: %r", rid, error)
        detail = ErrorDetail(code="state_unavailable", message=STATE_UNAVAILABLE, retryable=True)
    else:
        log.error("request %s: the stream failed", rid, exc_info=error)
        detail = ErrorDetail(code="internal_error", message=internal_message(rid))
    detail.request_id = rid or None
    return ErrorBody(error=detail)


def install_error_handlers(app: FastAPI, metrics: ApiMetrics, retry_after_s: int) -> None:
    retry = {"Retry-After": str(retry_after_s)}

    def answer(
        request: Request, status: int, code: str, message: str, headers: dict | None = None, retryable: bool = False,
    ) -> JSONResponse:
        metrics.errors.labels(code).inc()
        return error_response(request, status, code, message, headers, retryable)

    async def chroma_error(request: Request, exc: ChromaError) -> JSONResponse:
        status = http_status(exc)
        if status == 500:
            return await internal_error(request, exc)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, RETRY_LATER):
            headers = retry
        return answer(request, status, exc.code, exc.message, headers, exc.retryable)

    async def state_unavailable(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("request %s: Redis unavailable: %r", request_id(request), exc)
        return answer(request, 503, "state_unavailable", STATE_UNAVAILABLE, retry, True)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, 422, "invalid_request", validation_message(exc.errors()) or "invalid request")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}.get(exc.status_code, "http_error")
        return answer(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.error("request %s: %s %s failed", rid, request.method, request.url.path, exc_info=exc)
        # Starlette answers unhandled errors outside the middleware stack: the id header goes on here.
        headers = {REQUEST_ID_HEADER: rid} if not isinstance(exc, ChromaError) else None
        return answer(request, 500, "internal_error", internal_message(rid), headers)

    app.add_exception_handler(ChromaError, chroma_error)
    app.add_exception_handler(RedisError, state_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


class RequestIdMiddleware:
    """Gives every HTTP request an id (the client's X-Request-Id if it sent a sane one), in `scope["state"]` and on
    the response. Plain ASGI, so streamed replies and client disconnects pass through untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = given if 0 < len(given) <= 64 and given.replace("-", "").replace("_", "").isalnum() else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
