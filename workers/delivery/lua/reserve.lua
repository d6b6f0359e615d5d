-- reserve.lua: reserve the send times of requests under a shared rate limit (GCRA, the generic
-- cell rate algorithm), for every worker on every host. Requests are given times one emission
-- interval apart, so they reach the partner evenly spaced; a burst tolerance lets that many
-- extra go at once after a quiet spell. While the partner's own announced budget is spent, a
-- time is at least its reset. The clock is Redis's (TIME), so hosts whose clocks differ agree.
-- Returns {now, send time 1, ..., send time n} in microseconds since the epoch; all are taken
-- (unless ARGV[5] refuses them).
-- KEYS[1]  {prefix}:ratelimit:<limit key>  string: theoretical arrival time (epoch us) of the next request
-- KEYS[2]  {prefix}:budget:<limit key>  string: sends left (budget_tighten.lua); expires at the partner's reset
-- ARGV[1]  emission interval T in microseconds (period / limit); 0: no limit of our own
-- ARGV[2]  burst tolerance in microseconds (a multiple of T); 0: strictly one T apart
-- ARGV[3]  1: also take from the partner's budget (KEYS[2]); 0: leave it alone
-- ARGV[4]  how many requests (n >= 1): a batch's deliveries in one call, in order
-- ARGV[5]  optional: the longest wait (us) the caller takes; a later last send time is returned
--          but not taken (the API refuses the request with 429 and spends no slot on it);
--          only with ARGV[3] = 0, as the budget's DECR is not undone
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = now
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
end
local ttl = -1
if ARGV[3] == '1' then ttl = redis.call('PTTL', KEYS[2]) end
local times = {now}
for i = 1, tonumber(ARGV[4]) do
  local send_at = math.max(now, tat - tolerance)
  -- A send after the partner's reset does not spend this window's budget.
  if ttl > 0 and send_at < now + ttl * 1000 and redis.call('DECR', KEYS[2]) < 0 then
    send_at = now + ttl * 1000
  end
  tat = math.max(tat, send_at) + interval
  times[i + 1] = send_at
end
local max_wait = tonumber(ARGV[5] or '-1')
if max_wait >= 0 and times[#times] - now > max_wait then
  return times
end
if interval > 0 then
  -- Whole numbers as digits ('%d'): how Redis turns a Lua number into an argument differs
  -- between versions, and PXAT takes no exponent form.
  redis.call('SET', KEYS[1], string.format('%d', tat),
             'PXAT', string.format('%d', math.floor(tat / 1000) + 1))
end
return times
