-- move_due.lua: publish the messages of one queue's delay set whose due time has come, ahead of
-- the messages waiting on the queue (they already waited their turn).
-- One call per queue: two movers never publish the same message twice.
-- KEYS[1]  {prefix}:delayed:<queue>  sorted set: wire message -> due time (epoch seconds)
-- KEYS[2]  the kombu queue list (workers.broker.keys.queue_list); it cannot carry our hash
--          tag, so this script needs a single-node or Sentinel Redis, as kombu itself does
-- ARGV[1]  now (epoch seconds)
-- ARGV[2]  the most messages to move in this call
--@include kombu_publish
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
-- Ahead of the queue's backlog, the earliest due taken first.
for i = #due, 1, -1 do
  redis.call('ZREM', KEYS[1], due[i])
  kombu_publish_next(KEYS[2], due[i])
end
return #due
