"""A reply's playback cursor: generated, sent and played ms, as far as the far end lets the server know."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class PlaybackCursor:
    """Without word from the far end (OpenAI Realtime over a WebSocket cannot hear the client's playback) it assumes
    real-time playback from the first audio sent; `report_played` replaces the estimate with what the far end said
    it played (a truncation, a mark)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.generated_ms = 0.0
        self.sent_ms = 0.0
        self.first_sent_at: float | None = None
        self.reported_ms: float | None = None
        self.underruns = 0

    def sent(self, ms: float) -> None:
        now = self.clock()
        if self.first_sent_at is None:
            self.first_sent_at = now
        elif 1000 * (now - self.first_sent_at) > self.sent_ms + 20:  # the far end ran dry before this arrived
            self.underruns += 1
            self.first_sent_at = now - self.sent_ms / 1000  # playback resumes from here
        self.sent_ms += ms

    def report_played(self, ms: float) -> None:
        self.reported_ms = ms

    def played_ms(self) -> float:
        if self.reported_ms is not None:
            return self.reported_ms
        if self.first_sent_at is None:
            return 0.0
        return min(self.sent_ms, 1000 * (self.clock() - self.first_sent_at))

    async def wait_played(self, target_ms: float, stall_s: float = 5.0) -> None:
        """Until `target_ms` have played, or nothing more has played for `stall_s`."""
        last, stalled_since = -1.0, self.clock()
        while (played := self.played_ms()) < target_ms:
            if played > last:
                last, stalled_since = played, self.clock()
            elif self.clock() - stalled_since > stall_s:
                return
            await asyncio.sleep(min(0.25, max(0.01, (target_ms - played) / 1000)))


class MarkCursor(PlaybackCursor):
    """Played ms come from the far end's acknowledgements alone (telephony marks): nothing is assumed, and underruns
    are what the transport sees (`CallSession.mark_acked`)."""

    def sent(self, ms: float) -> None:
        self.first_sent_at = self.first_sent_at or self.clock()
        self.sent_ms += ms

    def played_ms(self) -> float:
        return self.reported_ms or 0.0
