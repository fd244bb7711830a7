"""Error answers: one JSON shape everywhere, status and code by error class, a request id on every response.

`{"error": {"code": "...", "message": "...", "request_id": "req_..."}}`. Caller mistakes (`CallerError`) answer
with their own status; `Unavailable` (and Redis being away) answers 503 with Retry-After; anything else is an
internal failure: 500 `internal_error`, the traceback in the server log under the request id, and nothing of it
in the body.
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
from model.errors import CallerError, ChromaError, QuotaExceeded, Unauthorized, Unavailable

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable kind, e.g. not_found, invalid_audio, over_capacity")
    message: str = Field(description="what was wrong, for people")
    request_id: str | None = Field(None, description="quote it when reporting a problem")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` entries for a route's error statuses."""
    descriptions = {
        400: "Malformed request", 401: "Missing or unknown API key", 404: "Unknown id (or another tenant's)",
        406: "No acceptable reply type", 409: "The session changed meanwhile", 413: "Body or audio over the limit",
        415: "Unsupported media type", 422: "Invalid request or audio",
        429: "The tenant is at its concurrency quota: retry after Retry-After seconds",
        503: "Over capacity, a stage or the state store unavailable: retry after Retry-After seconds",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


def validation_message(errors: list[dict]) -> str:
    """pydantic / FastAPI validation errors as one line: 'field.path: problem; ...'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def error_response(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, request_id=request_id(request) or None))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: ApiMetrics, retry_after_s: int) -> None:
    retry = {"Retry-After": str(retry_after_s)}

    def answer(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(code).inc()
        return error_response(request, status, code, message, headers)

    async def chroma_error(request: Request, exc: ChromaError) -> JSONResponse:
        if isinstance(exc, CallerError):
            headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
            headers = retry if isinstance(exc, QuotaExceeded) else headers
            return answer(request, exc.status, exc.code, exc.message, headers)
        if isinstance(exc, Unavailable):
            return answer(request, 503, exc.code, exc.message, retry)
        return await internal_error(request, exc)

    async def state_unavailable(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("request %s: Redis unavailable: %r", request_id(request), exc)
        return answer(request, 503, "state_unavailable", "the state store is unavailable; retry shortly", retry)

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
        return answer(request, 500, "internal_error", f"internal error; quote request id {rid} when reporting it", headers)

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
