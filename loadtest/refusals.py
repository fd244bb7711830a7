"""How the Locust users take a refusal, as a telephony backend would: counted apart from failures and tried again
after the server's Retry-After, with jitter, so that callers refused together do not all come back at once.

A refusal is a 503 (`over_capacity`, `stage_unavailable`) or 429 (the tenant's quota) answering a turn, a session
or a call's handshake; a Twilio call closed with 1013 (try again later); or a live call's reply refused in-band
(`response.done` failed with `over_capacity`: no reply place freed up within the queue's budget). Each is reported
as request type REFUSED, named after what was refused and why, and never as a failure; what is still refused after
`MAX_ATTEMPTS` tries is a failure.
"""

from __future__ import annotations

import asyncio
import json
import random

REFUSED_STATUSES = (429, 503)
MAX_ATTEMPTS = 5


def retry_delay_s(retry_after: str | None) -> float:
    """The server's Retry-After (seconds; 1 s when it gave none), stretched by a random 0-100 %."""
    try:
        floor = max(float(retry_after), 0.0) if retry_after is not None else 1.0
    except ValueError:  # an HTTP date: not what this server sends
        floor = 1.0
    return floor * random.uniform(1.0, 2.0)


def error_code(body: bytes | str) -> str | None:
    """The code of an error body ({"error": {"code": ...}}), if it is one."""
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def report_refusal(environment, what: str, code: str | None) -> None:
    environment.events.request.fire(request_type="REFUSED", name=f"{what}: {code or 'refused'}", response_time=0,
                                    response_length=0, exception=None, context={})


class Refused(Exception):
    """What was refused (a call, a reply), the error code, and the server's Retry-After if it gave one."""

    def __init__(self, what: str, code: str | None, retry_after: str | None = None):
        super().__init__(f"{what} refused: {code}")
        self.what, self.code, self.retry_after = what, code, retry_after


async def retrying(environment, attempt):
    """`await attempt()` until it does not raise Refused: each refusal reported, then a wait of Retry-After with
    jitter; the refusal of the last attempt is raised (a failure)."""
    for tries in range(1, MAX_ATTEMPTS + 1):
        try:
            return await attempt()
        except Refused as refused:
            if tries == MAX_ATTEMPTS:
                raise
            report_refusal(environment, refused.what, refused.code)
            await asyncio.sleep(retry_delay_s(refused.retry_after))
