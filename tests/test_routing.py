"""Session affinity for the Reasoner's replicas (deployments/routing.py): the router's choice, without a cluster
(the live tests run turns through it; test_chaos kills the replica a session was on)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from cluster.pipeline.turn import ReasonerCall
from deployments.routing import SessionAffinityRouter, rendezvous_rank


def replicas(*ids: str) -> list:
    return [SimpleNamespace(replica_id=SimpleNamespace(unique_id=i)) for i in ids]


def choose(candidates: list, session: str | None) -> list[list[str]]:
    router = object.__new__(SessionAffinityRouter)  # its choice reads only the candidates and the request
    request = None if session is None else SimpleNamespace(args=[ReasonerCall(session, None), None])
    ranks = asyncio.run(router.choose_replicas(candidates, request))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_session_keeps_its_replica_and_moves_only_when_it_is_gone():
    three = replicas("a", "b", "c")
    sessions = [f"sess_{n:032x}" for n in range(300)]
    first = {s: choose(three, s)[0] for s in sessions}
    assert all(len(f) == 1 for f in first.values())
    assert {s: choose(list(reversed(three)), s)[0] for s in sessions} == first  # whatever the order, every router
    assert len({f[0] for f in first.values()}) == 3  # spread over the replicas
    for s in sessions[:20]:
        preferred, fallback = choose(three, s)
        assert sorted(preferred + fallback) == ["a", "b", "c"]  # the others take it when that one is full
    # "b" goes away: its sessions move to their next choice, every other session stays where it was.
    two = [r for r in three if r.replica_id.unique_id != "b"]
    for s in sessions:
        now = choose(two, s)[0]
        assert now == first[s] if first[s] != ["b"] else now == [rendezvous_rank(s, ["a", "b", "c"])[1]]


def test_calls_without_a_session_go_to_two_random_replicas():
    ranks = choose(replicas("a", "b", "c"), None)
    assert len(ranks) == 1 and len(ranks[0]) == 2 and set(ranks[0]) <= {"a", "b", "c"}
    assert choose(replicas("a"), "sess_x") == [["a"]]
