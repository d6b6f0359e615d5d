-- drained_queues.lua: the ledger sweep's first step when the broker is an instance of its own:
-- which of the given queues have stayed empty for the hold. Runs on the broker instance, which
-- holds the queues and the drained hash (config/keys.py).
-- KEYS[1]     {prefix}:ledger:drained    hash: queue -> when a sweep first saw it empty
-- KEYS[2..]   kombu queue lists (workers.broker.keys.queue_list), one per queue looked at;
--             they cannot carry our hash tag, so this script needs a single-node or Sentinel
--             Redis, as kombu itself does
-- ARGV[1]     now (epoch seconds)
-- ARGV[2]     hold (seconds)
-- ARGV[3..]   the queue name of each of KEYS[2..], in order
--@include queue_drained
local now, hold = tonumber(ARGV[1]), tonumber(ARGV[2])
local ready = {}
for i = 2, #KEYS do
  if queue_drained(KEYS[1], KEYS[i], ARGV[i + 1], now, hold, ARGV[1]) then
    ready[#ready + 1] = ARGV[i + 1]
  end
end
return ready
