-- enqueue_once.lua: for each message, claim its key and only if the claim was free put the
-- message on its queue (or in the queue's delay set) and record it in the delivery ledger.
-- A batch message (several deliveries of one queue in one task message) goes out in place of
-- its members' own messages when every member's claim was free; when any member was already
-- claimed (a duplicate), each claimed member goes out alone in its own message instead.
-- One atomic call: a crash can never leave a claimed key without its message.
-- KEYS[1]     {prefix}:ledger              sorted set: delivery id -> progress deadline
-- KEYS[2]     {prefix}:ledger:messages     hash: delivery id -> "queue\n" + wire message
-- KEYS[2i+1]  claim of message i           {prefix}:dedupe:<id> or {prefix}:reconcile:...:done:...
-- KEYS[2i+2]  target of message i          a kombu queue list, or its {prefix}:delayed:<queue>
-- ARGV[1]     claim TTL (seconds)
-- ARGV[2]     ledger lease (seconds): a tracked delivery's deadline is its due time plus this
-- ARGV[3]     n, the number of messages
-- ARGV[5i-1..5i+3]  message i: "z" (delay set) or "l" (queue), due (epoch s), its own wire
--             message, ledger id ("" = not tracked), its queue's name
-- ARGV[5n+4..]  then per batch: m, the indexes of its m members (all "l" to one queue), the
--             batch's wire message
-- Hash tags: every {prefix} key shares the prefix's tag; kombu's queue lists cannot carry it,
-- so this script needs a single-node or Sentinel Redis, as kombu itself does.
--@include kombu_publish
local ttl, lease, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, sent = {}, {}
for i = 1, n do
  out[i] = redis.call('SET', KEYS[2 * i + 1], '1', 'NX', 'EX', ttl) and 1 or 0
end
local b = 5 * n + 4
while b <= #ARGV do
  local m = tonumber(ARGV[b])
  local whole = true
  for j = 1, m do
    if out[tonumber(ARGV[b + j])] == 0 then whole = false end
  end
  if whole then
    kombu_publish(KEYS[2 * tonumber(ARGV[b + 1]) + 2], ARGV[b + m + 1])
    for j = 1, m do sent[tonumber(ARGV[b + j])] = true end
  end
  b = b + m + 2
end
for i = 1, n do
  local a = 4 + (i - 1) * 5
  if out[i] == 1 then
    if sent[i] then
      -- published in its batch
    elseif ARGV[a] == 'z' then
      redis.call('ZADD', KEYS[2 * i + 2], ARGV[a + 1], ARGV[a + 2])
    else
      kombu_publish(KEYS[2 * i + 2], ARGV[a + 2])
    end
    if ARGV[a + 3] ~= '' then
      redis.call('ZADD', KEYS[1], tonumber(ARGV[a + 1]) + lease, ARGV[a + 3])
      redis.call('HSET', KEYS[2], ARGV[a + 3], ARGV[a + 4] .. '\n' .. ARGV[a + 2])
    end
  end
end
return out
