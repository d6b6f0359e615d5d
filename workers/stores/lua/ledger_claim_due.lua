-- ledger_claim_due.lua: the ledger sweep's second step when the broker is an instance of its
-- own: take the deliveries past their deadline whose queue is drained (drained_queues.lua said
-- so), push each one's deadline on and return its message for the caller to publish. Two
-- sweeps never take one delivery twice; a publish that fails is taken again after the lease.
-- KEYS[1]     {prefix}:ledger            sorted set: delivery id -> progress deadline
-- KEYS[2]     {prefix}:ledger:messages   hash: delivery id -> "queue\n" + wire message
-- ARGV[1]     now (epoch seconds)
-- ARGV[2]     the next deadline of a delivery taken
-- ARGV[3]     the most due deliveries to look at
-- ARGV[4..]   the names of the queues that are drained
local ready = {}
for i = 4, #ARGV do ready[ARGV[i]] = true end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local taken = {}
for _, id in ipairs(due) do
  local value = redis.call('HGET', KEYS[2], id)
  if value then
    local queue = string.sub(value, 1, string.find(value, '\n', 1, true) - 1)
    if ready[queue] then
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      taken[#taken + 1] = value
    end
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return taken
