-- ledger_take_unpublished.lua: take the deliveries whose message never reached the broker (its
-- push failed after the ledger recorded them) for the caller to publish now: no drained hold,
-- as for a message that may sit in a worker's prefetch buffer. Each one's deadline is pushed on
-- as a fresh publish's would be; one settled meanwhile is dropped. Runs on the state instance.
-- KEYS[1]  {prefix}:ledger:unpublished   set of delivery ids whose message is on no queue
-- KEYS[2]  {prefix}:ledger               sorted set: delivery id -> progress deadline
-- KEYS[3]  {prefix}:ledger:messages      hash: delivery id -> "queue\n" + wire message
-- ARGV[1]  the most deliveries to take
-- ARGV[2]  the next deadline of a delivery taken
local taken = {}
for _, id in ipairs(redis.call('SPOP', KEYS[1], ARGV[1])) do
  local value = redis.call('HGET', KEYS[3], id)
  if value and redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    taken[#taken + 1] = id
    taken[#taken + 1] = value
  end
end
return taken
