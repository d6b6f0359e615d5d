-- deadletter_to_ledger.lua: a replay's state half, when the broker is an instance of its own:
-- remove the dead letter and record its fresh message in the delivery ledger, in one atomic
-- step (two replays of one entry deliver it once). The caller then publishes the message on the
-- broker; should that fail, the ledger's sweep publishes it. 0 when the entry was already gone.
-- KEYS[1]  {prefix}:dlq:entries        hash: delivery id -> dead-letter entry (JSON)
-- KEYS[2]  {prefix}:dlq:index          sorted set: delivery id -> dead-letter time
-- KEYS[3]  {prefix}:dlq:counts         hash: destination -> number of entries
-- KEYS[4]  {prefix}:ledger             sorted set: delivery id -> progress deadline
-- KEYS[5]  {prefix}:ledger:messages    hash: delivery id -> "queue\n" + wire message
-- ARGV[1]  delivery id
-- ARGV[2]  the delivery's queue name, a newline and the wire message to publish
-- ARGV[3]  destination
-- ARGV[4]  the delivery's progress deadline (epoch seconds)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
return 1
