-- release.lua: free a lease the caller's token holds, at once or after a minimum hold
-- (Backend::release). scripts.rs puts common.lua in front of it.
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
-- KEYS[2]  the fair queue  <prefix>:{<resource>}:queue (see acquire.lua)
-- KEYS[3]  the fencing counter  <prefix>:{<resource>}:fence (see acquire.lua): written when a
--            mutex lease ends here, since the lock hash no longer holds its token; a
--            semaphore's expiry follows the lock key's
-- ARGV[1]  token of the caller
-- ARGV[2]  the resource name
-- ARGV[3]  keep the lease until this time (ms since epoch), or 0
-- ARGV[4]  keep the lease at least this long after it was acquired (ms), or 0
-- ARGV[5]  the longest a minimum hold may last from now (ms): the server's maximum TTL
-- ARGV[6]  '1' to release only if the lease was last renewed by the KeepAlive stream ARGV[7]
--            (its k field), '0' to release regardless
-- ARGV[7]  that KeepAlive stream's id (ignored unless ARGV[6] is '1')
--
-- Publishes "<resource>\n<fair queue head or empty>" on RELEASED (common.lua) so the right
-- waiter is woken, when anyone waits: the lease is marked w (see acquire.lua) or a fair queue
-- exists. Publishes the Watch event on EVENTS only while someone listens there (watched).
-- Redis TIME is read only when the answer depends on it: a semaphore, a minimum hold, or an
-- event to stamp. A mutex released at once by its holder needs neither.
-- Returns {OK, frees-at ms}  released (frees-at is the minimum-hold point, or now; 0 when the
--                            lease was freed at once and Redis's time was not read: lockd then
--                            answers with its own clock),
--         {NOT_HELD}         not held (free, expired, or already released),
--         {HELD_BY_OTHER}    held by another token, or ARGV[8] is '1' and the lease was last
--                            renewed elsewhere (nothing changed).
local now, now_s
local token = ARGV[1]
-- A mutex's fields, and n, which only a semaphore has.
local h = redis.call('HMGET', KEYS[1], 't', 'f', 'a', 'o', 'r', 'w', 'n', 'k')
local semaphore = h[7]
local min_hold = ARGV[3] ~= '0' or ARGV[4] ~= '0'
if semaphore or min_hold then
  now, now_s = clock()
end
local fence, acquired, owner, lingering, waited, renewer
if semaphore then
  h = redis.call('HMGET', KEYS[1], 'f:' .. token, 'a:' .. token, 'o:' .. token, 'r:' .. token, 'e:' .. token, 'w', 'k:' .. token)
  if not h[1] or tonumber(h[5]) <= now then
    return {NOT_HELD}
  end
  fence, acquired, owner, lingering, waited, renewer = h[1], tonumber(h[2]), h[3], h[4], h[6], h[7]
else
  if not h[1] then
    return {NOT_HELD}
  end
  if h[1] ~= token then
    return {HELD_BY_OTHER}
  end
  fence, acquired, owner, lingering, waited, renewer = h[2], tonumber(h[3]), h[4], h[5], h[6], h[8]
end
if lingering then
  return {NOT_HELD}
end
if ARGV[6] == '1' and renewer ~= ARGV[7] then
  return {HELD_BY_OTHER}
end
local frees_at = now
if min_hold then
  frees_at = math.max(tonumber(ARGV[3]), acquired + tonumber(ARGV[4]))
  frees_at = math.min(frees_at, now + tonumber(ARGV[5]))
end
if min_hold and frees_at > now then
  if semaphore then
    redis.call('HSET', KEYS[1], 'r:' .. token, 1, 'e:' .. token, frees_at)
  else
    redis.call('HSET', KEYS[1], 'r', 1)
    redis.call('PEXPIREAT', KEYS[1], frees_at)
    redis.call('SET', KEYS[3], fence, 'PX', frees_at - now + GRACE)
  end
else
  frees_at = now
  if semaphore then
    redis.call('HDEL', KEYS[1], 'e:' .. token, 'f:' .. token, 'a:' .. token, 'o:' .. token, 'g:' .. token, 'r:' .. token, 'k:' .. token)
  else
    -- The lease ends now: the lock hash goes, and the counter holds its token for GRACE.
    redis.call('DEL', KEYS[1])
    keep_fence(KEYS[3], fence, 0)
  end
end
if semaphore then
  -- The key ends with its latest live holder, and goes with the last.
  set_lifetime(KEYS[1], KEYS[3], settle_semaphore(KEYS[1], now, nil).latest, now)
end
-- A fair queue only exists while its waiters have seen a lease, which marked it w (see
-- acquire.lua): without w, the queue need not be read.
local head = nil
if waited then
  head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
end
if watched() then
  if not now then
    now, now_s = clock()
    frees_at = now
  end
  local frees_at_s = frees_at == now and now_s or frees_at
  redis.call('PUBLISH', EVENTS, 'R\n' .. ARGV[2] .. '\n' .. owner .. '\n' .. fence .. '\n' .. now_s .. '\n' .. frees_at_s)
end
if waited or head then
  redis.call('PUBLISH', RELEASED, ARGV[2] .. '\n' .. (head or ''))
end
return {OK, frees_at or 0}
