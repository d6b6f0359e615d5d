-- queue_drained.lua: has a kombu queue list stayed empty for the hold? Included
-- (--@include queue_drained) by the ledger's sweep scripts (workers/stores/ledger.py says why
-- the hold): a delivery behind a backlog, or in a worker's prefetch buffer, is waiting, not lost.
-- KEYS: none of its own. ``drained`` is the ledger's drained hash (queue -> when a sweep first
--   saw it empty) and ``list`` the queue's kombu list; the including script declares both.
-- ARGV: none of its own. ``now`` and ``hold`` are seconds; ``stamp`` is ``now`` as written.
local function queue_drained(drained, list, queue, now, hold, stamp)
  if redis.call('LLEN', list) > 0 then
    redis.call('HDEL', drained, queue)
    return false
  end
  local since = tonumber(redis.call('HGET', drained, queue))
  if not since then
    redis.call('HSET', drained, queue, stamp)
    since = now
  end
  return now - since >= hold
end
