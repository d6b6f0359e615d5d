-- pause.lua: keep the later of the existing and the new pause of a destination, in one step:
-- a shorter pause never overwrites a longer one another worker wrote between a read and a
-- write, and a pause costs one round trip. 1 when the new pause was stored.
-- KEYS[1]  {prefix}:paused:<destination>  string: {"until": epoch s, "reason": ...} (JSON)
-- ARGV[1]  the new pause's end (epoch seconds)
-- ARGV[2]  the value to store
-- ARGV[3]  the key's expiry (epoch ms)
local current = redis.call('GET', KEYS[1])
if current then
  local ok, stored = pcall(cjson.decode, current)
  if ok and type(stored) == 'table' and tonumber(stored['until'])
      and tonumber(stored['until']) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
return 1
