-- deadletter_remove.lua: purge one dead letter from the entries, the index and the counts.
-- KEYS[1]  {prefix}:dlq:entries  hash: delivery id -> dead-letter entry (JSON)
-- KEYS[2]  {prefix}:dlq:index    sorted set: delivery id -> dead-letter time
-- KEYS[3]  {prefix}:dlq:counts   hash: destination -> number of entries
-- ARGV[1]  delivery id
-- ARGV[2]  destination
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[2], -1)
return 1
