"""Fault injection on a local cluster, for chaos tests and `loadtest/chaos.py`: kill a stage's replica (or the
Serve proxy) the way a crash would, and see which replicas are alive.

A stage is a Serve deployment (Ingress, Codec, SpeechStack, Reasoner), or `proxy` for Serve's HTTP proxy. A kill
is `ray.kill` of one ALIVE actor, which dies at once, mid-request; the Serve controller then starts a new one.

`python -m cluster.ops.faults` joins the cluster named by the CHROMA_LOCAL_* settings and answers one JSON line
per command line read from stdin: `kill STAGE` -> {"killed": actor id}, `alive` -> {stage: [actor ids]},
`stats` -> each engine's live work (`cluster.ops.local.engine_stats`). Ray reads
its auth settings once per process, so a test process that serves several clusters drives each one through such
a child process.
"""

from __future__ import annotations

import json
import sys

from cluster.ops.local import APP_NAME, LocalClusterSettings, connected_engine_stats, ray_driver

STAGES = ("Ingress", "Codec", "SpeechStack", "Reasoner", "proxy")


def _class_name(stage: str) -> str:
    if stage == "proxy":
        return "ProxyActor"
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    return f"ServeReplica:{APP_NAME}:{stage}"


def alive(stage: str) -> list:
    """The ALIVE actors of `stage` (ray.util.state ActorState)."""
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", _class_name(stage)), ("state", "=", "ALIVE")])


def kill(stage: str) -> str:
    """Kill one live replica of `stage` (the first listed) at once; returns its actor id."""
    import ray

    actors = alive(stage)
    if not actors:
        raise RuntimeError(f"{stage} has no live replica to kill")
    victim = actors[0]
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=False)
    return victim.actor_id


def main() -> int:
    with ray_driver(LocalClusterSettings()):
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            print(json.dumps(answer(line)), flush=True)
    return 0


def answer(line: str) -> dict:
    command, *rest = line.split() or [""]
    try:
        if command == "kill":
            return {"killed": kill(rest[0])}
        if command == "alive":
            return {stage: [a.actor_id for a in alive(stage)] for stage in STAGES}
        if command == "stats":
            return connected_engine_stats()
        return {"error": f"unknown command {command!r}"}
    except Exception as error:  # the caller reads it and decides
        return {"error": repr(error)}


if __name__ == "__main__":
    sys.exit(main())
