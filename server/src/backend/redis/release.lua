-- release.lua: free the lock if the caller's token holds it (Backend::release).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
-- ARGV[1]  token of the caller
-- ARGV[2]  the wake-up channel, <prefix>:released, that every lockd subscribes to once
-- ARGV[3]  the resource name, published on ARGV[2] so waiters on it are woken
--
-- Returns 1 released, 0 not held (free or expired), -1 held by another token (nothing changed).
local t = redis.call('HGET', KEYS[1], 't')
if not t then
  return 0
end
if t ~= ARGV[1] then
  return -1
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
