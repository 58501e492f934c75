-- acquire.lua: one attempt to take the lock on a resource (Backend::acquire).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>}, fields:
--            t = token (the secret), o = owner, f = fencing token, a = acquired-at (ms since epoch),
--            l:<name> = one field per label. The hash carries the lease's TTL.
-- KEYS[2]  the fencing counter  <prefix>:{<resource>}:fence, an integer that never expires.
-- ARGV[1]  token of the caller
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  owner (free text)
-- ARGV[4], ARGV[5], ...  label name, label value, ... (pairs, possibly none)
--
-- Returns, with now = Redis TIME in ms:
--   {1, fencing token, acquired-at, now}   granted; also when ARGV[1] already holds the lock, in
--                                           which case the TTL is refreshed and the fencing token kept
--   {0, fencing token, acquired-at, now, remaining ms, owner, name1, value1, ...}
--                                           held by another token (the holder, without its token)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held = redis.call('HMGET', KEYS[1], 't', 'f', 'a', 'o')
if held[1] then
  if held[1] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(held[2]), tonumber(held[3]), now}
  end
  local reply = {0, tonumber(held[2]), tonumber(held[3]), now, redis.call('PTTL', KEYS[1]), held[4]}
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'l:' then
      reply[#reply + 1] = string.sub(fields[i], 3)
      reply[#reply + 1] = fields[i + 1]
    end
  end
  return reply
end
local fence = redis.call('INCR', KEYS[2])
local hash = {'t', ARGV[1], 'o', ARGV[3], 'f', fence, 'a', now}
for i = 4, #ARGV, 2 do
  hash[#hash + 1] = 'l:' .. ARGV[i]
  hash[#hash + 1] = ARGV[i + 1]
end
redis.call('HSET', KEYS[1], unpack(hash))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, fence, now, now}
