-- reserve.lua: reserve the send time of one request under a shared rate limit (GCRA, the generic
-- cell rate algorithm), for every worker on every host. Requests are given times one emission
-- interval apart, so they reach the partner evenly spaced; a burst tolerance lets that many
-- extra go at once after a quiet spell. While the partner's own announced budget is spent, the
-- time is at least its reset. The clock is Redis's (TIME), so hosts whose clocks differ agree.
-- Returns {send time, now} in microseconds since the epoch; the time is taken either way.
-- KEYS[1]  {prefix}:ratelimit:<limit key>  string: theoretical arrival time (epoch us) of the next request
-- KEYS[2]  {prefix}:budget:<limit key>  string: sends left (budget_tighten.lua); expires at the partner's reset
-- ARGV[1]  emission interval T in microseconds (period / limit); 0: no limit of our own
-- ARGV[2]  burst tolerance in microseconds (a multiple of T); 0: strictly one T apart
-- ARGV[3]  1: also take from the partner's budget (KEYS[2]); 0: leave it alone
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local tat = now
local send_at = now
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
  send_at = math.max(now, tat - tonumber(ARGV[2]))
end
if ARGV[3] == '1' then
  -- A send after the partner's reset does not spend this window's budget.
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 and send_at < now + ttl * 1000 and redis.call('DECR', KEYS[2]) < 0 then
    send_at = now + ttl * 1000
  end
end
if interval > 0 then
  -- Whole numbers as digits ('%d'): how Redis turns a Lua number into an argument differs
  -- between versions, and PXAT takes no exponent form.
  local next_tat = math.max(tat, send_at) + interval
  redis.call('SET', KEYS[1], string.format('%d', next_tat),
             'PXAT', string.format('%d', math.floor(next_tat / 1000) + 1))
end
return {send_at, now}
