"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cluster.api.errors import error_response, error_responses
from cluster.api.schemas import Health, Ready, StageReport
from cluster.api.services import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses=error_responses(503))
async def readyz(request: Request, services: ServicesDep) -> Response | Ready:
    """Redis and every stage can take turns (with the capacity admission control sees); 503 names what is not."""
    problems = []
    try:
        with anyio.fail_after(2.0):
            await services.state.redis.ping()
    except Exception:
        problems.append("redis: unreachable")
    stages = await services.admission.stages()
    problems += [f"{s.name}: {s.problem or 'not ready'}" for s in stages if not s.ready]
    if problems:
        return error_response(request, 503, "not_ready", "; ".join(problems), retryable=True)
    return Ready(
        status="ready", capacity=services.admission.capacity(), call_budget=services.admission.call_budget(),
        reply_share=services.admission.reply_share(),
        stages=[StageReport(name=s.name, replicas=s.replicas, capacity=s.capacity, step_ms_by_batch=s.step_ms) for s in stages],
    )


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
