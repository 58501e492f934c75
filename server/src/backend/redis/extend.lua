-- extend.lua: lengthen the lease the caller's token holds (Backend::extend).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
-- ARGV[1]  token of the caller
-- ARGV[2]  TTL in milliseconds: added to the remaining time, or replacing it (ARGV[3])
-- ARGV[3]  '1' to replace the remaining time with ARGV[2], '0' to add ARGV[2] to it
-- ARGV[4]  the largest remaining time allowed, in milliseconds (the server's maximum TTL)
-- ARGV[5]  the events channel <prefix>:events (for Watch)
-- ARGV[6]  the resource name (for the event)
--
-- Returns {1, fencing token, now (Redis TIME in ms), new remaining ms} when extended,
--         {0} when not held (free, expired, or released with a minimum hold),
--         {-1} when held by another token.
local t = redis.call('TIME')
-- now in ms, also as a string (see acquire.lua: Redis formats Lua numbers with printf).
local us = t[2]
local now_s = t[1] .. string.sub(string.rep('0', 6 - #us) .. us, 1, 3)
local now = tonumber(now_s)
local token = ARGV[1]
local semaphore = redis.call('HGET', KEYS[1], 'n')
local fence, owner, remaining
if semaphore then
  local h = redis.call('HMGET', KEYS[1], 'f:' .. token, 'o:' .. token, 'r:' .. token, 'e:' .. token)
  if not h[1] or h[3] or tonumber(h[4]) <= now then
    return {0}
  end
  fence, owner, remaining = h[1], h[2], tonumber(h[4]) - now
else
  local h = redis.call('HMGET', KEYS[1], 't', 'f', 'o', 'r')
  if not h[1] or h[4] then
    return {0}
  end
  if h[1] ~= token then
    return {-1}
  end
  fence, owner, remaining = h[2], h[3], math.max(redis.call('PTTL', KEYS[1]), 0)
end
local ttl = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  ttl = ttl + remaining
end
ttl = math.min(ttl, tonumber(ARGV[4]))
if semaphore then
  redis.call('HSET', KEYS[1], 'e:' .. token, now + ttl)
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
else
  redis.call('PEXPIRE', KEYS[1], ttl)
end
redis.call('PUBLISH', ARGV[5], 'E\n' .. ARGV[6] .. '\n' .. owner .. '\n' .. fence .. '\n' .. now_s .. '\n' .. (now + ttl))
return {1, tonumber(fence), now, ttl}
