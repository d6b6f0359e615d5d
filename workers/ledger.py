"""The delivery ledger: every accepted delivery until it is finished, so none can be lost.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged in a
second round trip; if Redis dies between the two, the message is in neither place. The
ledger closes that gap from our side. produce() records each delivery with its message (in
the same Lua call that enqueues it); every start, retry or deferral moves its deadline on by
the lease; finishing (delivered, dead-lettered, skipped, aggregated) removes it. A sweep
publishes again whatever passed its deadline without progress, once its queue has drained (a
delivery behind a backlog is waiting, not lost). Duplicates are possible (a message a dead
worker had prefetched comes back from kombu too), loss is not; every copy carries the same
idempotency key.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from config.keys import RedisKeys

_SWEEP_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local published = 0
local drained = {}  -- per queue: was it empty when this sweep began?
for _, id in ipairs(due) do
  local value = redis.call('HGET', KEYS[2], id)
  if value then
    local cut = string.find(value, '\\n', 1, true)
    local queue = string.sub(value, 1, cut - 1)
    -- A delivery can only be stalled, not merely waiting, once its queue has drained: while a
    -- backlog remains, leave it for a later sweep instead of sending a duplicate.
    if drained[queue] == nil then
      drained[queue] = redis.call('LLEN', queue) == 0
    end
    if drained[queue] then
      redis.call('LPUSH', queue, string.sub(value, cut + 1))
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      published = published + 1
    end
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return published
"""

TERMINAL = frozenset({"delivered", "dead_lettered", "skipped", "aggregated"})


class DeliveryLedger:
    def __init__(self, client: redis.Redis, keys: RedisKeys, lease_seconds: float) -> None:
        self.redis = client
        self.keys = keys
        self.lease_seconds = lease_seconds
        self._sweep = client.register_script(_SWEEP_LUA)

    def touch(self, pipe: Any, delivery_id: str, now: float) -> None:
        """A start: the delivery is alive; push its deadline on (only if it is tracked)."""
        pipe.zadd(self.keys.ledger(), {delivery_id: now + self.lease_seconds}, xx=True)

    def park(self, pipe: Any, delivery_id: str, queue: str, wire: str, due: float) -> None:
        """A retry or deferral: this is now the message to publish again, after ``due``."""
        pipe.zadd(self.keys.ledger(), {delivery_id: due + self.lease_seconds})
        pipe.hset(self.keys.ledger_messages(), delivery_id, f"{queue}\n{wire}")

    def settle(self, pipe: Any, delivery_id: str) -> None:
        pipe.zrem(self.keys.ledger(), delivery_id)
        pipe.hdel(self.keys.ledger_messages(), delivery_id)

    def sweep(self, now: float | None = None, limit: int = 500) -> int:
        """Publish again the deliveries past their deadline; returns how many."""
        now = time.time() if now is None else now
        return int(
            self._sweep(
                keys=[self.keys.ledger(), self.keys.ledger_messages()],
                args=[now, now + self.lease_seconds, limit],
            )
        )

    def size(self) -> int:
        return int(self.redis.zcard(self.keys.ledger()))
