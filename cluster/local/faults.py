"""Fault injection on a local cluster, for chaos tests and `loadtest/chaos.py`: kill a stage's replica (or the
Serve proxy) the way a crash would, and see which replicas are alive.

A stage is a Serve deployment (Ingress, Codec, SpeechStack, Reasoner), or `proxy` for Serve's HTTP proxy. A kill
is `ray.kill` of one ALIVE actor, which dies at once, mid-request; the Serve controller then starts a new one.
`paused(pids)` stops a stage's replica processes where they stand (SIGSTOP, as a stalled process or a long GC pause
would) for the length of a block: their calls wait and nothing is lost. It needs the replicas on this machine.

`python -m cluster.local.faults` joins the cluster named by the CHROMA_LOCAL_* settings and answers one JSON line
per command line read from stdin: `kill STAGE` -> {"killed": actor id}, `alive` -> {stage: [actor ids]},
`pids STAGE` -> {"pids": the live replicas' process ids},
`replicas` -> {deployment: RUNNING replicas}, `stats` -> each engine's live work (`cluster.local.supervisor.engine_stats`).
`FaultAgent` runs it as a child process. Ray reads
its auth settings once per process, so a test process that serves several clusters drives each one through such
a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict

from pydantic import TypeAdapter

from cluster.local.supervisor import APP_NAME, LocalClusterSettings, connected_engine_stats, ray_driver, settings_env
from model.engines.codec import CodecStats
from model.engines.speech import SpeechStats
from model.reasoner.base import ReasonerStats
from model.reasoner.vllm.engine import VLLMReasonerStats

STAGES = ("Ingress", "Codec", "SpeechStack", "Reasoner", "proxy")
# What each engine's deployment reports (`connected_engine_stats`), by deployment.
ENGINE_STATS = {"Reasoner": VLLMReasonerStats | ReasonerStats, "SpeechStack": SpeechStats, "Codec": CodecStats}


def _class_name(stage: str) -> str:
    if stage == "proxy":
        return "ProxyActor"
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    return f"ServeReplica:{APP_NAME}:{stage}"


def alive(stage: str) -> list:
    """The ALIVE actors of `stage` (ray.util.state ActorState)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address,  # this cluster's, not another on the machine
                       filters=[("class_name", "=", _class_name(stage)), ("state", "=", "ALIVE")])


def kill(stage: str) -> str:
    """Kill one live replica of `stage` (the first listed) at once; returns its actor id."""
    import ray

    actors = alive(stage)
    if not actors:
        raise RuntimeError(f"{stage} has no live replica to kill")
    victim = actors[0]
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=False)
    return victim.actor_id


@contextlib.contextmanager
def paused(pids: list[int]):
    """Stop these processes where they stand until the block ends. The pids come first (`FaultAgent.pids`), so the
    stop itself is instant. One gone meanwhile (a replica the autoscaler stopped) runs nothing to stop; whatever was
    stopped runs again however the block ends, the stopping included."""
    stopped: list[int] = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # it was killed meanwhile
                os.kill(pid, signal.SIGCONT)


def running_replicas() -> dict[str, int]:
    """RUNNING replicas per deployment, as the Serve controller counts them (STARTING and STOPPING ones not)."""
    from ray import serve

    deployments = serve.status().applications[APP_NAME].deployments
    return {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}


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
        if command == "pids":
            return {"pids": [a.pid for a in alive(rest[0])]}
        if command == "alive":
            return {stage: [a.actor_id for a in alive(stage)] for stage in STAGES}
        if command == "replicas":
            return running_replicas()
        if command == "stats":
            return {name: asdict(stats) for name, stats in connected_engine_stats().items()}
        return {"error": f"unknown command {command!r}"}
    except Exception as error:  # the caller reads it and decides
        return {"error": repr(error)}


def read_engine_stats(sent: dict) -> dict[str, ReasonerStats | SpeechStats | CodecStats]:
    """The agent's `stats` answer (the engines' stats as JSON) typed again."""
    return {name: TypeAdapter(ENGINE_STATS[name]).validate_python(stats) for name, stats in sent.items()}


class FaultAgent:
    """`python -m cluster.local.faults` for one cluster, as a child process."""

    def __init__(self, settings: LocalClusterSettings, timeout_s: float = 120.0):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.local.faults"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env={**os.environ, **settings_env(settings)},
        )
        if not json.loads(self.process.stdout.readline() or "{}").get("ready"):
            self.close()
            raise RuntimeError("the fault agent could not join the cluster")

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"{line}: {answer['error']}")
        return answer

    def kill(self, stage: str) -> str:
        return self.ask(f"kill {stage}")["killed"]

    def pids(self, stage: str) -> list[int]:
        return self.ask(f"pids {stage}")["pids"]

    def alive(self) -> dict[str, list[str]]:
        return self.ask("alive")

    def replicas(self) -> dict[str, int]:
        return self.ask("replicas")

    def stats(self) -> dict[str, ReasonerStats | SpeechStats | CodecStats]:
        return read_engine_stats(self.ask("stats"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


if __name__ == "__main__":
    sys.exit(main())
