-- enqueue_claim.lua: enqueue_once.lua's state half, when the broker is an instance of its own:
-- for each message, claim its key and only if the claim was free record it in the delivery
-- ledger. The caller then puts the claimed messages on the broker (workers/broker/publish.py);
-- should that fail, the ledger's sweep publishes them: the ledger is the durability anchor.
-- KEYS[1]     {prefix}:ledger              sorted set: delivery id -> progress deadline
-- KEYS[2]     {prefix}:ledger:messages     hash: delivery id -> "queue\n" + wire message
-- KEYS[i+2]   claim of message i           {prefix}:dedupe:<id> or {prefix}:reconcile:...:done:...
-- ARGV[1]     claim TTL (seconds)
-- ARGV[2]     ledger lease (seconds): a tracked delivery's deadline is its due time plus this
-- ARGV[3]     n, the number of messages
-- ARGV[3i+1..3i+3]  message i: due (epoch s), ledger id ("" = not tracked), and its queue's
--             name, a newline and its own wire message
local ttl, lease, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 1, n do
  local a = 3 * i + 1
  out[i] = redis.call('SET', KEYS[i + 2], '1', 'NX', 'EX', ttl) and 1 or 0
  if out[i] == 1 and ARGV[a + 1] ~= '' then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[a]) + lease, ARGV[a + 1])
    redis.call('HSET', KEYS[2], ARGV[a + 1], ARGV[a + 2])
  end
end
return out
