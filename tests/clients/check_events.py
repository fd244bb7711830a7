"""Run by the clients' venv (`make clients-venv`), never by the server's: reads server events as JSON lines on stdin
and prints, per event type, what pipecat's and LiveKit Agents' own code makes of them:

- pipecat 1.14: `parse_server_event`, its pydantic models (it skips the types it does not model, and raises in its
  receive loop on one that fails its model);
- LiveKit Agents 1.8: its receive loop dispatches on the type (`RealtimeSession._run_ws`) onto the `openai` SDK's
  models, which it builds without validation, so each event is validated against the same model here.
"""

from __future__ import annotations

import inspect
import json
import sys

from livekit.agents.llm._realtime import openai as livekit_realtime
from openai.types.realtime import RealtimeServerEvent
from pipecat.services.openai.realtime import events as pipecat_events
from pydantic import TypeAdapter


def main() -> None:
    livekit_loop = inspect.getsource(livekit_realtime.RealtimeSession._run_ws)
    sdk = TypeAdapter(RealtimeServerEvent)
    report: dict[str, dict[str, str]] = {}
    for line in sys.stdin:
        kind = json.loads(line)["type"]
        seen = report.setdefault(kind, {})
        try:
            seen.setdefault("pipecat", "parsed" if pipecat_events.parse_server_event(line) is not None else "skipped")
        except Exception as error:  # noqa: BLE001 (what pipecat's receive loop would raise)
            seen["pipecat"] = f"error: {str(error).splitlines()[0]}"
        if f'"{kind}"' not in livekit_loop:
            seen.setdefault("livekit", "skipped")
            continue
        try:
            sdk.validate_json(line)
            seen.setdefault("livekit", "parsed")
        except Exception as error:  # noqa: BLE001
            seen["livekit"] = f"error: {str(error).splitlines()[0]}"
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
