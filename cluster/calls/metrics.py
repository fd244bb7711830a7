"""What the call engine measures, as it sees it: the API's metrics implement this (`cluster.api.metrics`), so the
engine does not depend on the layer above it."""

from __future__ import annotations

from typing import Protocol


class CallMetrics(Protocol):
    def observe_voice_to_voice(self, seconds: float, vad_window_s: float) -> None:
        """From the caller's turn committed to the reply's first audio sent; the window is the turn detector's."""

    def observe_barge_in(self, seconds: float) -> None:
        """From caller speech over a reply to the reply stopped at the far end."""

    def count_underrun(self) -> None:
        """The far end ran out of a reply's audio before the reply was over."""
