-- xmp_mark_sent.lua: after XMP took a batch, clean each record that did not change while it
-- was being sent (same version); a record counted into meanwhile stays dirty for the next flush.
-- KEYS[1]      {prefix}:xmp:<destination>:dirty              sorted set: request ids to send
-- KEYS[2..]    {prefix}:xmp:<destination>:rec:<request id>   one record hash per sent record
-- ARGV[2j-1]   the request id of KEYS[j+1]
-- ARGV[2j]     the version of KEYS[j+1] that was sent
local cleaned = 0
for j = 1, #KEYS - 1 do
  if redis.call('HGET', KEYS[j + 1], 'version') == ARGV[2 * j] then
    redis.call('ZREM', KEYS[1], ARGV[2 * j - 1])
    cleaned = cleaned + 1
  end
end
return cleaned
