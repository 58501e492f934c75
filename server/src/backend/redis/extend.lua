-- extend.lua: lengthen the lease the caller's token holds (Backend::extend).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
-- ARGV[1]  token of the caller
-- ARGV[2]  TTL in milliseconds: added to the remaining time, or replacing it (ARGV[3])
-- ARGV[3]  '1' to replace the remaining time with ARGV[2], '0' to add ARGV[2] to it
-- ARGV[4]  the largest remaining time allowed, in milliseconds (the server's maximum TTL)
--
-- Returns {1, fencing token, now (Redis TIME in ms), new remaining ms} when extended,
--         {0} when not held (free or expired), {-1} when held by another token.
local held = redis.call('HMGET', KEYS[1], 't', 'f')
if not held[1] then
  return {0}
end
if held[1] ~= ARGV[1] then
  return {-1}
end
local ttl = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  ttl = ttl + math.max(redis.call('PTTL', KEYS[1]), 0)
end
ttl = math.min(ttl, tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[1], ttl)
local t = redis.call('TIME')
return {1, tonumber(held[2]), t[1] * 1000 + math.floor(t[2] / 1000), ttl}
