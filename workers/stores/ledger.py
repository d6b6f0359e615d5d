"""The delivery ledger: every accepted delivery until it is finished, so none can be lost.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged in a
second round trip; if Redis dies between the two, the message is in neither place. The
ledger closes that gap from our side. produce() records each delivery with its message (in
the same Lua call that enqueues it); every start, retry or deferral moves its deadline on by
the lease; finishing (delivered, dead-lettered, skipped, aggregated) removes it. A sweep
publishes again whatever passed its deadline without progress, once its queue has stayed
empty for the hold (a delivery behind a backlog, or in a worker's prefetch buffer at the end of
one, is waiting, not lost). Duplicates are possible (a message a dead
worker had prefetched comes back from kombu too), loss is not; every copy carries the same
idempotency key.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from config.keys import RedisKeys

# KEYS[1]: the ledger, KEYS[2]: its messages, KEYS[3]: queue -> when a sweep first saw it
# empty; KEYS[4...]: the queues to watch. ARGV: now, the next deadline, limit, hold (seconds).
_SWEEP_LUA = """
local now, hold = tonumber(ARGV[1]), tonumber(ARGV[4])
local ready = {}  -- per queue: has it stayed empty for the hold?
local function drained(queue)
  if ready[queue] == nil then
    if redis.call('LLEN', queue) > 0 then
      redis.call('HDEL', KEYS[3], queue)
      ready[queue] = false
    else
      local since = tonumber(redis.call('HGET', KEYS[3], queue))
      if not since then
        redis.call('HSET', KEYS[3], queue, ARGV[1])
        since = now
      end
      ready[queue] = now - since >= hold
    end
  end
  return ready[queue]
end
-- Every sweep looks at every queue, so "empty since" is never older than one sweep interval.
for i = 4, #KEYS do drained(KEYS[i]) end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local published = 0
for _, id in ipairs(due) do
  local value = redis.call('HGET', KEYS[2], id)
  if value then
    local cut = string.find(value, '\\n', 1, true)
    local queue = string.sub(value, 1, cut - 1)
    -- While a backlog remains, a delivery is waiting, not lost. Once the queue is empty, the
    -- last messages taken from it may still wait in a worker's prefetch buffer, not started:
    -- only after the hold (the visibility timeout) is each of those started, acked or
    -- restored by kombu, and a delivery still past its deadline really is lost.
    if drained(queue) then
      redis.call('LPUSH', queue, string.sub(value, cut + 1))
      redis.call('HDEL', KEYS[3], queue)
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      published = published + 1
    end
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return published
"""


class DeliveryLedger:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        lease_seconds: float,
        drained_hold_seconds: float = 0.0,
    ) -> None:
        """``drained_hold_seconds``: how long a queue must stay empty before the sweep
        publishes its deliveries again (a worker's: its visibility timeout)."""
        self.redis = client
        self.keys = keys
        self.lease_seconds = lease_seconds
        self.drained_hold_seconds = drained_hold_seconds
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

    def sweep(self, now: float | None = None, limit: int = 500, queues: Sequence[str] = ()) -> int:
        """Publish again the deliveries past their deadline whose queue has stayed empty for
        the hold; returns how many. ``queues``: watched on every sweep (a worker's queues)."""
        now = time.time() if now is None else now
        return int(
            self._sweep(
                keys=[
                    self.keys.ledger(),
                    self.keys.ledger_messages(),
                    self.keys.ledger_drained(),
                    *queues,
                ],
                args=[now, now + self.lease_seconds, limit, self.drained_hold_seconds],
            )
        )

    def size(self) -> int:
        return int(self.redis.zcard(self.keys.ledger()))
