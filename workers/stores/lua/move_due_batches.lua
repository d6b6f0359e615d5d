-- move_due_batches.lua: publish due messages of one queue's delay set grouped, several
-- deliveries to a task message. The caller read the due members and built each group's batch
-- message; a group goes out as that one message only if this call removed every member from
-- the set (no other mover took one in between), else each member it removed goes out as itself.
-- So two movers never publish the same delivery twice.
-- KEYS[1]  {prefix}:delayed:<queue>  sorted set: wire message -> due time (epoch seconds)
-- KEYS[2]  the kombu queue list (workers.broker.keys.queue_list); it cannot carry our hash
--          tag, so this script needs a single-node or Sentinel Redis, as kombu itself does
-- ARGV[1..] per group: m, its m members (as they are in the set), the group's batch message
--@include kombu_publish
local moved, b = 0, 1
while b <= #ARGV do
  local m = tonumber(ARGV[b])
  local removed = {}
  for j = 1, m do
    if redis.call('ZREM', KEYS[1], ARGV[b + j]) == 1 then removed[#removed + 1] = ARGV[b + j] end
  end
  if #removed == m then
    kombu_publish(KEYS[2], ARGV[b + m + 1])
  else
    for _, message in ipairs(removed) do kombu_publish(KEYS[2], message) end
  end
  moved = moved + #removed
  b = b + m + 2
end
return moved
