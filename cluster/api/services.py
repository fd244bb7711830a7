"""What the route handlers work with, one per app: state, tenants, the turn backend, admission control, settings,
metrics; and the admission of live calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from cluster.admission.control import Admission, Ticket
from cluster.api.metrics import ApiMetrics
from cluster.errors import Unauthorized
from cluster.pipeline.turn import TurnBackend
from cluster.settings.api import ApiSettings
from cluster.settings.calls import CallSettings, TelephonySettings
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory


@dataclass
class Services:
    state: StateStore
    tenants: TenantDirectory
    backend: TurnBackend
    admission: Admission
    settings: ApiSettings
    metrics: ApiMetrics
    call_settings: CallSettings
    telephony_settings: TelephonySettings

    async def admit_call(self, tenant: str, protocol: str) -> Ticket:
        """A live call's place in the cluster (the same admission control as turns: TenantLimit, CapacityError,
        StageUnavailable); release it with `release_call`."""
        ticket = await self.admission.admit(tenant, "call")
        self.metrics.calls_live.labels(protocol).inc()
        return ticket

    async def release_call(self, ticket: Ticket, protocol: str) -> None:
        self.metrics.calls_live.labels(protocol).dec()
        await ticket.release()


def services(request: Request) -> Services:
    return request.app.state.services


bearer = HTTPBearer(auto_error=False, description="the tenant's API key: `Authorization: Bearer <key>`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the tenant's API key, the other way")


def tenant(
    found: Annotated[Services, Depends(services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    header_key: Annotated[str | None, Security(api_key_header)],
) -> str:
    """The tenant the request's API key names (401 without a known key)."""
    key = credentials.credentials.strip() if credentials and credentials.credentials.strip() else header_key
    name = found.tenants.tenant_for(key)
    if name is None:
        raise Unauthorized("missing or unknown API key (send 'Authorization: Bearer <key>')")
    return name


ServicesDep = Annotated[Services, Depends(services)]
TenantDep = Annotated[str, Depends(tenant)]
