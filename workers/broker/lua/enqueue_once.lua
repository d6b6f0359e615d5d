-- enqueue_once.lua: for each message, claim its key and only if the claim was free put the
-- message on its queue (or in the queue's delay set) and record it in the delivery ledger.
-- One atomic call: a crash can never leave a claimed key without its message.
-- KEYS[1]     {prefix}:ledger              sorted set: delivery id -> progress deadline
-- KEYS[2]     {prefix}:ledger:messages     hash: delivery id -> "queue\n" + wire message
-- KEYS[2i+1]  claim of message i           {prefix}:dedupe:<id> or {prefix}:reconcile:...:done:...
-- KEYS[2i+2]  target of message i          a kombu queue list, or its {prefix}:delayed:<queue>
-- ARGV[1]     claim TTL (seconds)
-- ARGV[2]     ledger lease (seconds): a tracked delivery's deadline is its due time plus this
-- ARGV[5i-2..5i+2]  message i: "z" (delay set) or "l" (queue), due (epoch s), wire message,
--             ledger id ("" = not tracked), its queue's name
-- Hash tags: every {prefix} key shares the prefix's tag; kombu's queue lists cannot carry it,
-- so this script needs a single-node or Sentinel Redis, as kombu itself does.
--@include kombu_publish
local ttl, lease = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local a = 3 + (i - 1) * 5
  if redis.call('SET', KEYS[2 * i + 1], '1', 'NX', 'EX', ttl) then
    if ARGV[a] == 'z' then
      redis.call('ZADD', KEYS[2 * i + 2], ARGV[a + 1], ARGV[a + 2])
    else
      kombu_publish(KEYS[2 * i + 2], ARGV[a + 2])
    end
    if ARGV[a + 3] ~= '' then
      redis.call('ZADD', KEYS[1], tonumber(ARGV[a + 1]) + lease, ARGV[a + 3])
      redis.call('HSET', KEYS[2], ARGV[a + 3], ARGV[a + 4] .. '\n' .. ARGV[a + 2])
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
