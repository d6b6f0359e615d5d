-- budget_tighten.lua: record what the partner says is left. Within one window (same reset
-- time) keep the lower count: a late answer must not hand back budget other sends already used.
-- KEYS[1]  {prefix}:budget:<destination>  string: sends left; expires at the partner's reset
-- ARGV[1]  sends left, as the partner says
-- ARGV[2]  the partner's reset time (epoch ms)
-- ARGV[3]  now (epoch ms)
local current = redis.call('GET', KEYS[1])
if current then
  local ends_at = tonumber(ARGV[3]) + redis.call('PTTL', KEYS[1])
  if math.abs(ends_at - tonumber(ARGV[2])) < 1000 and tonumber(current) <= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
return 1
