"""The public HTTP API as a FastAPI app (no Ray here: the Ingress deployment serves `build_api`'s app).

Every request but /healthz, /readyz, /metrics and /console names its tenant with `Authorization: Bearer <key>` or
`X-API-Key: <key>`. Errors are JSON everywhere (cluster.api.errors). The OpenAPI document is at /openapi.json,
the docs at /docs.

    POST   /v1/voices                  multipart: audio (file), transcript, name -> 201 Voice
    GET    /v1/voices                  {"voices": [Voice, ...]}
    GET    /v1/voices/{id}             Voice
    DELETE /v1/voices/{id}             204
    POST   /v1/sessions                JSON {voice_id, system_prompt?, output_format?, sampling?, truncation?} -> 201
    GET    /v1/sessions/{id}           Session
    PATCH  /v1/sessions/{id}           JSON {voice_id?, system_prompt?, truncation?} -> Session
    DELETE /v1/sessions/{id}           204
    DELETE /v1/sessions/{id}/history/{item_id}   Session, without that message
    POST   /v1/sessions/{id}/turns     body: caller audio; the reply streamed (cluster.api.turns)
    GET    /healthz  /readyz  /metrics
    WS     /v1/realtime                a live call, OpenAI Realtime protocol (cluster.api.realtime)
    WS     /v1/telephony/twilio        a phone call, Twilio Media Streams (cluster.api.telephony); /telnyx likewise
    GET    /console                    a browser console for live calls (cluster.api.console)
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from cluster.admission.control import Admission
from cluster.api import console, health, realtime, sessions, telephony, turns, voices
from cluster.api.errors import RequestIdMiddleware, install_error_handlers
from cluster.api.metrics import ApiMetrics
from cluster.api.services import Services
from cluster.pipeline.turn import TurnBackend
from cluster.settings.admission import AdmissionSettings
from cluster.settings.api import ApiSettings
from cluster.settings.calls import CallSettings, TelephonySettings
from cluster.state.ledger import AdmissionLedger
from cluster.state.store import StateStore
from cluster.state.tenants import TenantDirectory

DESCRIPTION = """Chroma 1.0 speech-to-speech dialogue with voice cloning, for telephony backends.

Clone a voice once (`POST /v1/voices`), open a session in it, then post each caller utterance as a turn: the
reply streams back in the cloned voice as it is generated. Authenticate with the tenant's API key."""


def build_api(
    state: StateStore, tenants: TenantDirectory, backend: TurnBackend, settings: ApiSettings | None = None,
    admission: AdmissionSettings | None = None, call_settings: CallSettings | None = None,
    telephony_settings: TelephonySettings | None = None,
) -> FastAPI:
    """Run it with its lifespan (Serve and uvicorn do): shutting down stops admission control's polling."""
    settings = settings or ApiSettings()
    metrics = ApiMetrics()
    ledger = AdmissionLedger(state.redis, state.settings.key_prefix)
    control = Admission(ledger, backend.stages, tenants, admission or AdmissionSettings(), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        control.start()
        yield
        await control.close()

    app = FastAPI(title="chroma-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.services = Services(state, tenants, backend, control, settings, metrics,
                                  call_settings or CallSettings(), telephony_settings or TelephonySettings())
    for module in (voices, sessions, turns, health, realtime, telephony, console):
        app.include_router(module.router)
    install_error_handlers(app, metrics, settings.retry_after_s)
    app.add_middleware(RequestIdMiddleware)
    return app
