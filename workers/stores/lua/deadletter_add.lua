-- deadletter_add.lua: store a dead letter, index it by time and count it once per destination.
-- KEYS[1]  {prefix}:dlq:entries  hash: delivery id -> dead-letter entry (JSON)
-- KEYS[2]  {prefix}:dlq:index    sorted set: delivery id -> dead-letter time
-- KEYS[3]  {prefix}:dlq:counts   hash: destination -> number of entries
-- ARGV[1]  delivery id
-- ARGV[2]  the entry (JSON)
-- ARGV[3]  dead-letter time (epoch seconds)
-- ARGV[4]  destination
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
