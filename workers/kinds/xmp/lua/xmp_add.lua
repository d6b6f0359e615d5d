-- xmp_add.lua: count one event into its XMP record once per event id; -1 when a total would
-- pass what Redis integers sum exactly, 0 when the event id was already counted, else 1.
-- KEYS[1]  {prefix}:xmp:<destination>:seen:<event id>      set once the event was counted
-- KEYS[2]  {prefix}:xmp:<destination>:rec:<request id>     hash: dims, count, amounts, version
-- KEYS[3]  {prefix}:xmp:<destination>:users:<request id>   HyperLogLog of device ids
-- KEYS[4]  {prefix}:xmp:<destination>:dirty                sorted set: request ids to send
-- ARGV[1]  seen-key TTL (seconds)
-- ARGV[2]  the record's dims (JSON)
-- ARGV[3]  device id ('' when the event has none)
-- ARGV[4]  request id
-- ARGV[5]  record TTL (seconds)
-- ARGV[6]  now (epoch seconds): the dirty score
-- ARGV[7..]  pairs of total field name and amount (integer units/micros) to add
local limit = 9.0e18
for i = 7, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if math.abs(current + tonumber(ARGV[i + 1])) >= limit then return -1 end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('HSETNX', KEYS[2], 'dims', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'count', 1)
for i = 7, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[3] ~= '' then
  redis.call('PFADD', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
return 1
