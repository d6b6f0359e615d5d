-- kombu_publish.lua: the one Lua publish of a Celery task message, as kombu's Redis transport
-- does it; included (--@include kombu_publish) by every script that puts a message on a queue.
-- KEYS: none of its own. ``queue`` is a kombu queue list the including script declares in its
--   KEYS (workers.broker.keys.queue_list); it cannot carry our hash tag.
-- ARGV: none of its own. ``wire`` is a message from workers/broker/wire.py.
local function kombu_publish(queue, wire)
  -- kombu.transport.redis.Channel._put: LPUSH onto the priority's list; workers BRPOP the
  -- other end, so a queue is first in, first out.
  redis.call('LPUSH', queue, wire)
end

-- A message that has already waited its turn (a due retry, a delivery back for its reserved
-- send time): onto the end workers take from, so it goes next instead of behind the queue's
-- backlog. Under a burst a rate-limited delivery would otherwise come back after its slot.
local function kombu_publish_next(queue, wire)
  redis.call('RPUSH', queue, wire)
end
