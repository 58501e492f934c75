-- extend.lua: lengthen the lease the caller's token holds (Backend::extend). scripts.rs puts
-- common.lua in front of it.
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
-- KEYS[2]  the fencing counter  <prefix>:{<resource>}:fence (see acquire.lua): a semaphore's
--            expiry follows the lock key's; a mutex's is kept as common.lua's keep_fence says
-- KEYS[3]  the fair queue  <prefix>:{<resource>}:queue (see acquire.lua): read to name the
--            next waiter when a shorter TTL wakes the waiters
-- ARGV[1]  token of the caller
-- ARGV[2]  TTL in milliseconds: added to the remaining time, or replacing it (ARGV[3])
-- ARGV[3]  '1' to replace the remaining time with ARGV[2], '0' to add ARGV[2] to it
-- ARGV[4]  the largest remaining time allowed, in milliseconds (the server's maximum TTL)
-- ARGV[5]  the resource name (for the event and the wake-up)
-- ARGV[6]  the KeepAlive stream renewing the lease, recorded as its k field; '' for a plain
--            Extend, which clears the field
--
-- The Watch event goes to EVENTS only while someone listens there (common.lua's watched). When
-- the new TTL ends the lease sooner than before and waiters have seen it, they are woken on
-- RELEASED to look again.
-- Returns {OK, fencing token, now (Redis TIME in ms), new remaining ms} when extended,
--         {NOT_HELD} when not held (free, expired, or released with a minimum hold),
--         {HELD_BY_OTHER} when held by another token.
local now, now_s = clock()
local token = ARGV[1]
-- One read for a mutex: its fields, the renewer (k) and w; n only a semaphore has.
local h = redis.call('HMGET', KEYS[1], 'n', 't', 'f', 'o', 'r', 'k', 'w')
local semaphore = h[1]
local renewer_field, renewer = 'k', h[6]
local fence, owner, remaining
if semaphore then
  renewer_field = 'k:' .. token
  h = redis.call('HMGET', KEYS[1], 'f:' .. token, 'o:' .. token, 'r:' .. token, 'e:' .. token, renewer_field)
  if not h[1] or h[3] or tonumber(h[4]) <= now then
    return {NOT_HELD}
  end
  fence, owner, remaining, renewer = h[1], h[2], tonumber(h[4]) - now, h[5]
else
  if not h[2] then
    return {NOT_HELD}
  end
  -- The token first, as release.lua does: a lease in its minimum hold is still another
  -- token's lease to a stranger, and no longer extendable by its own token.
  if h[2] ~= token then
    return {HELD_BY_OTHER}
  end
  if h[5] then
    return {NOT_HELD}
  end
  fence, owner = h[3], h[4]
  -- The remaining time is only needed to add to it, or to wake waiters (w) if the new TTL is
  -- shorter: a KeepAlive renewal that replaces the TTL of a lease nobody waits for skips PTTL.
  if ARGV[3] ~= '1' or h[7] then
    remaining = math.max(redis.call('PTTL', KEYS[1]), 0)
  end
end
local ttl = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  ttl = ttl + remaining
end
ttl = math.min(ttl, tonumber(ARGV[4]))
if remaining and ttl < remaining then
  shortened(KEYS[1], KEYS[3], ARGV[5])
end
-- The renewer is written only when it changes: a stream's renewals leave it as it is.
if ARGV[6] == '' then
  if renewer then
    redis.call('HDEL', KEYS[1], renewer_field)
  end
elseif renewer ~= ARGV[6] then
  redis.call('HSET', KEYS[1], renewer_field, ARGV[6])
end
if semaphore then
  redis.call('HSET', KEYS[1], 'e:' .. token, now + ttl)
  -- The key ends with its latest live holder, which this one may no longer be.
  set_lifetime(KEYS[1], KEYS[2], settle_semaphore(KEYS[1], now, nil).latest, now)
else
  redis.call('PEXPIRE', KEYS[1], ttl)
  keep_fence(KEYS[2], fence, ttl)
end
if watched() then
  redis.call('PUBLISH', EVENTS, 'E\n' .. ARGV[5] .. '\n' .. owner .. '\n' .. fence .. '\n' .. now_s .. '\n' .. (now + ttl))
end
return {OK, tonumber(fence), now, ttl}
