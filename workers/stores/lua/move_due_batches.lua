-- move_due_batches.lua: publish due messages of one queue's delay set grouped, several
-- deliveries to a task message. The caller read the due members and built each group's batch
-- message; a group goes out as that one message only if this call removed every member from
-- the set (no other mover took one in between), else each member it removed goes out as itself.
-- So two movers never publish the same delivery twice. Due messages go ahead of the queue's
-- backlog, as move_due.lua's do.
-- KEYS[1]  {prefix}:delayed:<queue>  sorted set: wire message -> due time (epoch seconds)
-- KEYS[2]  the kombu queue list (workers.broker.keys.queue_list); it cannot carry our hash
--          tag, so this script needs a single-node or Sentinel Redis, as kombu itself does
-- ARGV[1..] per group: m, its m members (as they are in the set), the group's batch message
--@include kombu_publish
local groups, b = {}, 1
while b <= #ARGV do
  local m = tonumber(ARGV[b])
  groups[#groups + 1] = b
  b = b + m + 2
end
-- Ahead of the queue's backlog (they already waited their turn), the earliest group taken first.
local moved = 0
for g = #groups, 1, -1 do
  b = groups[g]
  local m = tonumber(ARGV[b])
  local removed = {}
  for j = 1, m do
    if redis.call('ZREM', KEYS[1], ARGV[b + j]) == 1 then removed[#removed + 1] = ARGV[b + j] end
  end
  if #removed == m then
    kombu_publish_next(KEYS[2], ARGV[b + m + 1])
  else
    for i = #removed, 1, -1 do kombu_publish_next(KEYS[2], removed[i]) end
  end
  moved = moved + #removed
end
return moved
