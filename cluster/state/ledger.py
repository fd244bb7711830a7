"""The admission ledger in Redis: which turns and calls hold the cluster's capacity now, shared by every Ingress.

Each admitted turn or call holds a ticket: a member of two sorted sets, its pool's and its tenant's for its
kind, scored by the time its lease runs out. There are two pools: reply places (HTTP turns, and live calls' replies
while they are generated) and calls (live calls, whatever they are doing). Admitting is one Lua script, so it is atomic across Ingress
replicas: drop run-out leases, check the tenant's quota, then the cluster's capacity, then add the ticket. The
Ingress holding tickets renews their leases every few seconds; an Ingress that dies without releasing its tickets
leaves leases that simply run out. Time is Redis's own (TIME): Ingress clocks do not matter.

Keys, for prefix `chroma` (one hash tag: every script's keys lie in one Redis Cluster slot):
  chroma:{admission}:live                       every reply place held: turns and calls' replies
  chroma:{admission}:calls                      every live call
  chroma:{admission}:tenant:<tenant>:<kind>     the tenant's tickets of that kind (turn, call)
"""

from __future__ import annotations

from enum import IntEnum

import redis.asyncio

from cluster.settings.tenants import Kind

_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

# KEYS: the pool's, the tenant's; ARGV: ticket, lease ms, capacity, tenant limit (-1: none)
_ACQUIRE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local limit = tonumber(ARGV[4])
if limit >= 0 and redis.call('ZCARD', KEYS[2]) >= limit then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 2 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
return 0
"""

# KEYS: each ticket's pool and tenant key, in pairs; ARGV: lease ms, then the tickets in the same order. Plain ZADD,
# not XX: a ticket whose lease ran out while Redis was away is put back, since its turn is still live.
_RENEW = _NOW_MS + """
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2 * i - 3], expiry, ARGV[i])
  redis.call('ZADD', KEYS[2 * i - 2], expiry, ARGV[i])
end
return #ARGV - 1
"""

# KEYS: the pools to count
_COUNT = _NOW_MS + """
local live = 0
for i = 1, #KEYS do
  live = live + redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
end
return live
"""


class Verdict(IntEnum):
    ADMITTED = 0
    TENANT_LIMIT = 1
    OVER_CAPACITY = 2


class AdmissionLedger:
    def __init__(self, client: redis.asyncio.Redis, key_prefix: str = "chroma"):
        self.redis = client
        self._live = f"{key_prefix}:{{admission}}:live"
        self._calls = f"{key_prefix}:{{admission}}:calls"
        self._tenant = f"{key_prefix}:{{admission}}:tenant:"
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._count = client.register_script(_COUNT)

    def _tenant_key(self, tenant: str, kind: Kind) -> str:
        return f"{self._tenant}{tenant}:{kind}"

    def _pool(self, kind: Kind) -> str:
        return self._calls if kind == "call" else self._live

    async def acquire(
        self, ticket: str, tenant: str, kind: Kind, capacity: int, tenant_limit: int | None, lease_s: float
    ) -> Verdict:
        keys = [self._pool(kind), self._tenant_key(tenant, kind)]
        limit = -1 if tenant_limit is None else tenant_limit
        return Verdict(int(await self._acquire(keys, [ticket, int(1000 * lease_s), capacity, limit])))

    async def renew(self, tickets: list[tuple[str, str, Kind]], lease_s: float) -> None:
        """`tickets`: (ticket, tenant, kind) of every ticket this Ingress holds."""
        if tickets:
            keys = [key for _, tenant, kind in tickets for key in (self._pool(kind), self._tenant_key(tenant, kind))]
            await self._renew(keys, [int(1000 * lease_s)] + [ticket for ticket, _, _ in tickets])

    async def release(self, ticket: str, tenant: str, kind: Kind) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._pool(kind), ticket)
            pipe.zrem(self._tenant_key(tenant, kind), ticket)
            await pipe.execute()

    async def live(self, kind: Kind | None = None) -> int:
        """Tickets whose lease has not run out, across every Ingress: in `kind`'s pool, or in both."""
        return int(await self._count([self._pool(kind)] if kind else [self._live, self._calls], []))
