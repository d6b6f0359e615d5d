-- ledger_sweep.lua: publish again the deliveries past their deadline whose queue has stayed
-- empty for the hold (workers/stores/ledger.py says why the hold).
-- KEYS[1]     {prefix}:ledger            sorted set: delivery id -> progress deadline
-- KEYS[2]     {prefix}:ledger:messages   hash: delivery id -> "queue\n" + wire message
-- KEYS[3]     {prefix}:ledger:drained    hash: queue -> when a sweep first saw it empty
-- KEYS[4..]   kombu queue lists: every queue the caller watches and every queue a due delivery
--             belongs to. A due delivery whose queue is not among them waits for the next sweep
--             (its caller reads the due queues first). kombu's lists cannot carry our hash
--             tag, so this script needs a single-node or Sentinel Redis, as kombu itself does.
-- ARGV[1]     now (epoch seconds)
-- ARGV[2]     the next deadline of a delivery published again
-- ARGV[3]     the most due deliveries to look at
-- ARGV[4]     hold (seconds)
-- ARGV[5..]   the queue name of each of KEYS[4..], in order
-- With separate broker and state instances the sweep is three steps instead
-- (drained_queues.lua on the broker, ledger_claim_due.lua on the state, then the publish).
--@include kombu_publish
--@include queue_drained
local now, hold = tonumber(ARGV[1]), tonumber(ARGV[4])
local list_of = {}  -- queue name -> its declared list
for i = 4, #KEYS do list_of[ARGV[i + 1]] = KEYS[i] end
local ready = {}  -- per queue: has it stayed empty for the hold?
local function drained(queue)
  if ready[queue] == nil then
    ready[queue] = queue_drained(KEYS[3], list_of[queue], queue, now, hold, ARGV[1])
  end
  return ready[queue]
end
-- Every sweep looks at every queue, so "empty since" is never older than one sweep interval.
for i = 4, #KEYS do drained(ARGV[i + 1]) end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local published = 0
for _, id in ipairs(due) do
  local value = redis.call('HGET', KEYS[2], id)
  if value then
    local cut = string.find(value, '\n', 1, true)
    local queue = string.sub(value, 1, cut - 1)
    -- While a backlog remains, a delivery is waiting, not lost. Once the queue is empty, the
    -- last messages taken from it may still wait in a worker's prefetch buffer, not started:
    -- only after the hold (the visibility timeout) is each of those started, acked or
    -- restored by kombu, and a delivery still past its deadline really is lost.
    if list_of[queue] and drained(queue) then
      kombu_publish(list_of[queue], string.sub(value, cut + 1))
      redis.call('HDEL', KEYS[3], queue)
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      published = published + 1
    end
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return published
