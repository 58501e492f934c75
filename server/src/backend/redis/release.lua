-- release.lua: free a lease the caller's token holds, at once or after a minimum hold
-- (Backend::release).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
-- KEYS[2]  the fair queue  <prefix>:{<resource>}:queue (see acquire.lua)
-- ARGV[1]  token of the caller
-- ARGV[2]  the wake-up channel <prefix>:released, which every lockd subscribes to once
-- ARGV[3]  the events channel <prefix>:events (for Watch)
-- ARGV[4]  the resource name
-- ARGV[5]  keep the lease until this time (ms since epoch), or 0
-- ARGV[6]  keep the lease at least this long after it was acquired (ms), or 0
-- ARGV[7]  the longest a minimum hold may last from now (ms): the server's maximum TTL
--
-- Publishes "<resource>\n<fair queue head or empty>" on ARGV[2] so the right waiter is woken,
-- when anyone waits: the lease is marked w (see acquire.lua) or a fair queue exists.
-- Returns {1, frees-at ms} released (frees-at is now, or the minimum-hold point),
--         {0} not held (free, expired, or already released), {-1} held by another token.
local t = redis.call('TIME')
-- now in ms, also as a string (see acquire.lua: Redis formats Lua numbers with printf).
local us = t[2]
local now_s = t[1] .. string.sub(string.rep('0', 6 - #us) .. us, 1, 3)
local now = tonumber(now_s)
local token = ARGV[1]
-- A mutex's fields, and n, which only a semaphore has.
local h = redis.call('HMGET', KEYS[1], 't', 'f', 'a', 'o', 'r', 'w', 'n')
local semaphore = h[7]
local fence, acquired, owner, lingering, waited
if semaphore then
  h = redis.call('HMGET', KEYS[1], 'f:' .. token, 'a:' .. token, 'o:' .. token, 'r:' .. token, 'e:' .. token, 'w')
  if not h[1] or tonumber(h[5]) <= now then
    return {0}
  end
  fence, acquired, owner, lingering, waited = h[1], tonumber(h[2]), h[3], h[4], h[6]
else
  if not h[1] then
    return {0}
  end
  if h[1] ~= token then
    return {-1}
  end
  fence, acquired, owner, lingering, waited = h[2], tonumber(h[3]), h[4], h[5], h[6]
end
if lingering then
  return {0}
end
local frees_at = math.max(tonumber(ARGV[5]), acquired + tonumber(ARGV[6]))
frees_at = math.min(frees_at, now + tonumber(ARGV[7]))
if frees_at > now then
  if semaphore then
    redis.call('HSET', KEYS[1], 'r:' .. token, 1, 'e:' .. token, frees_at)
    local latest = frees_at
    local fields = redis.call('HGETALL', KEYS[1])
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'e:' then
        latest = math.max(latest, tonumber(fields[i + 1]))
      end
    end
    redis.call('PEXPIREAT', KEYS[1], latest)
  else
    redis.call('HSET', KEYS[1], 'r', 1)
    redis.call('PEXPIREAT', KEYS[1], frees_at)
  end
else
  frees_at = now
  if semaphore then
    redis.call('HDEL', KEYS[1], 'e:' .. token, 'f:' .. token, 'a:' .. token, 'o:' .. token, 'g:' .. token, 'r:' .. token)
    -- Only n (and w) left: no holder.
    if redis.call('HLEN', KEYS[1]) <= (waited and 2 or 1) then
      redis.call('DEL', KEYS[1])
    end
  else
    redis.call('DEL', KEYS[1])
  end
end
-- A fair queue only exists while its waiters have seen a lease, which marked it w (see
-- acquire.lua): without w, the queue need not be read.
local head = nil
if waited then
  head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
end
local frees_at_s = frees_at == now and now_s or frees_at
redis.call('PUBLISH', ARGV[3], 'R\n' .. ARGV[4] .. '\n' .. owner .. '\n' .. fence .. '\n' .. now_s .. '\n' .. frees_at_s)
if waited or head then
  redis.call('PUBLISH', ARGV[2], ARGV[4] .. '\n' .. (head or ''))
end
return {1, frees_at}
