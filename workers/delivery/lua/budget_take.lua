-- budget_take.lua: take one send from the partner's own count of what is left (e.g. X's
-- x-rate-limit-remaining), shared by every worker. -1 when granted (or no count is known);
-- otherwise the milliseconds until the partner's reset time.
-- KEYS[1]  {prefix}:budget:<destination>  string: sends left; expires at the partner's reset
-- ARGV: none
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('DECR', KEYS[1]) >= 0 then return -1 end
return redis.call('PTTL', KEYS[1])
