-- deadletter_replay.lua: publish a dead letter's fresh message and remove the entry, in one
-- atomic step: two replays of one entry deliver it once. 0 when the entry was already gone.
-- KEYS[1]  {prefix}:dlq:entries  hash: delivery id -> dead-letter entry (JSON)
-- KEYS[2]  {prefix}:dlq:index    sorted set: delivery id -> dead-letter time
-- KEYS[3]  {prefix}:dlq:counts   hash: destination -> number of entries
-- KEYS[4]  the kombu queue list of the delivery's kind; it cannot carry our hash tag, so this
--          script needs a single-node or Sentinel Redis, as kombu itself does
-- ARGV[1]  delivery id
-- ARGV[2]  the wire message to publish
-- ARGV[3]  destination
--@include kombu_publish
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
kombu_publish(KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
return 1
