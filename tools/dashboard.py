"""The Grafana dashboard of the Helm chart (helm/chroma-serve/dashboards/chroma-serve.json), made from PANELS.

To add a panel, add a `Panel` to PANELS and run `make dashboard` (`python -m tools.dashboard`: it rewrites the JSON).
tests/test_dashboard.py checks that the JSON is this output and that every metric and label a panel queries is one
the app exports at /metrics (cluster/api/metrics.py). Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "chroma-serve" / "dashboards" / "chroma-serve.json"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana unit id: "short", "s", "reqps", ...
    queries: tuple[tuple[str, str], ...]  # (legend, PromQL)
    description: str = ""


def quantiles(metric: str, window: str = "5m", by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)
              ) -> tuple[tuple[str, str], ...]:
    """Quantiles of a histogram across every scraped replica, one series per value of the label `by`, if any."""
    legend = f" {by.replace('_', ' ')} {{{{{by}}}}}" if by else ""
    return tuple((f"p{int(q * 100)}{legend}",
                  f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket[{window}])))")
                 for q in qs)


PANELS = (
    Panel("Live turns", "short", (("streaming", "sum(chroma_live_turns)"),),
          "Turns streaming a reply now."),
    Panel("Queue depth", "short", (("waiting", "sum(chroma_turns_waiting)"),),
          "Turns accepted that have not sent their first audio yet."),
    Panel("Time to first audio", "s", quantiles("chroma_turn_ttfa_seconds"),
          "End of the caller's upload to the first reply audio byte."),
    Panel("Real-time factor", "short", quantiles("chroma_turn_rtf"),
          "Generation time / reply audio duration; below 1 is faster than real time."),
    Panel("Frames per second", "short", (("frames/s", "sum(rate(chroma_frames_total[1m]))"),),
          "Reply audio frames generated (12.5 per second of audio each turn)."),
    Panel("Turns by outcome", "reqps", (("{{outcome}}", "sum by (outcome) (rate(chroma_turns_total[5m]))"),)),
    Panel("Refusals and errors by reason", "reqps", (("{{kind}}", "sum by (kind) (rate(chroma_errors_total[5m]))"),),
          "Error responses and failed streams by code, e.g. capacity (503), unauthorized, payload_too_large."),
    Panel("Live calls", "short", (("{{protocol}}", "sum by (protocol) (chroma_calls_live)"),),
          "Live calls (/v1/realtime, /v1/telephony/*) by protocol."),
    Panel("Voice-to-voice latency", "s", quantiles("chroma_call_voice_to_voice_seconds", by="vad_window", qs=(0.5, 0.95)),
          "End of the caller's speech (included) or the turn's commit (excluded) to the first reply audio sent."),
    Panel("Calls refused by reason", "reqps", (("{{reason}}", "sum by (reason) (rate(chroma_calls_refused_total[5m]))"),),
          "Calls refused at the handshake: unauthorized, tenant_concurrency_limit, over_capacity, ..."),
    Panel("Barge-in to reply stopped", "s", quantiles("chroma_call_barge_in_seconds"),
          "Caller speech detected during a reply to the reply and its playback stopped."),
)


def _panel(index: int, panel: Panel) -> dict:
    return {
        "id": index + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (legend, expr) in enumerate(panel.queries)],
    }


def dashboard() -> dict:
    return {
        "title": "chroma-serve", "uid": "chroma-serve", "tags": ["chroma-serve", "ray-serve"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus"}]},
        "panels": [_panel(i, p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def queried_series(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression of this dashboard's kind reads: its identifiers that are no
    function call, and the labels of its `by (...)` groups."""
    labels = {name for group in re.findall(r"by \(([^)]*)\)", expr) for name in re.split(r"\s*,\s*", group) if name}
    bare = re.sub(r"by \([^)]*\)|\[[^\]]*\]", "", expr)  # groupings and range selectors out
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?![a-zA-Z0-9_:]|\s*\()", bare))
    return names, labels


if __name__ == "__main__":
    DASHBOARD.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD.write_text(render())
    print(f"wrote {DASHBOARD} ({len(PANELS)} panels)", file=sys.stderr)
