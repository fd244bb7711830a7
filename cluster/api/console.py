"""/console: a browser console for live calls over /v1/realtime, one static page (console.html beside this module,
package data) with no build step and nothing fetched from outside the cluster, since many deployments reach
nothing outside it.

The page asks for the API key and keeps it in the tab's sessionStorage; it sends it as `Authorization: Bearer` over
HTTP and as the `openai-insecure-api-key.<key>` subprotocol on the WebSocket (cluster.api.realtime.endpoint). The page
itself needs no key: it holds none, and does nothing until one is typed in."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["console"])

PAGE = resources.files(__package__).joinpath("console.html").read_text(encoding="utf-8")
# Nothing from elsewhere: the page's own inline code, its worklet from a blob: URL, calls to this app, a data: icon.
POLICY = ("default-src 'none'; script-src 'unsafe-inline' blob:; style-src 'unsafe-inline'; connect-src 'self'; "
          "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@router.get("/console", response_class=HTMLResponse, include_in_schema=False)
async def console() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"Content-Security-Policy": POLICY, "Referrer-Policy": "no-referrer"})
