"""Session affinity for the Reasoner: a session's turns go to the replica that holds its prefix.

A call's next prompt is its last one plus what is new, and vLLM's prefix cache (with its processor cache of the
call's caller audio) lives in one replica. `SessionAffinityRouter` (a Ray Serve request router, as Ray Serve LLM's
prefix-aware router is) ranks the replicas by rendezvous hashing of the session id: every router (one per
SpeechStack replica) picks the same replica for a session, and when that replica is gone, or full, the session's
turns go to the next one in its ranking, which reads the audio it lacks from Redis once and holds it from then on.
Adding or removing a replica moves only the sessions that ranked it first. Calls that name no session (probes,
stats) go to two random replicas, the lesser loaded of which takes them, as Serve's default router does.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous_rank(key: str, replica_ids: list[str]) -> list[str]:
    """`replica_ids` from the one `key` prefers most to the least (highest random weight hashing)."""
    def weight(replica_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=weight, reverse=True)


def session_of(request: PendingRequest | None) -> str | None:
    """The session a Reasoner call is for (its first argument is a `ReasonerCall`)."""
    if request is None or not request.args:
        return None
    return getattr(request.args[0], "session_id", None)


class SessionAffinityRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        session = session_of(pending_request)
        if session is None or len(candidate_replicas) < 2:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [by_id[replica_id] for replica_id in rendezvous_rank(session, list(by_id))]
        return [[ranked[0]], ranked[1:]]
