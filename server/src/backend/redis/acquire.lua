-- acquire.lua: one attempt to take a lock or a semaphore slot (Backend::acquire).
-- scripts.rs puts common.lua in front of it.
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>}. Its TTL is that of its latest live lease: it
--            goes with its last live holder.
--            A mutex has the fields t = token (the secret), o = owner, f = fencing token,
--            a = acquired-at (ms since epoch), l:<name> = one field per label, r = 1 once
--            released with a minimum hold (the lease then only waits out its TTL), and k = the
--            KeepAlive stream that renewed it last (absent after a plain Extend or re-acquire).
--            A semaphore has n = its limit and, per holder token T: f:T, a:T, o:T, e:T (expiry,
--            ms since epoch), g:T (labels, cjson array name1, value1, ...), r:T and k:T (as
--            above).
--            Both may have w = 1: a waiting request saw this lease, so its release must wake
--            waiters (release.lua publishes a wake-up only then, or when a fair queue exists).
-- KEYS[2]  the fencing counter  <prefix>:{<resource>}:fence: the last fencing token given, as
--            an integer, GRACE ms (common.lua) beyond the lease that has it. A semaphore
--            always keeps it; a mutex only where its lock hash cannot stand for it (common.lua's
--            keep_fence), so a free resource may have none.
-- KEYS[3]  the fair queue  <prefix>:{<resource>}:queue, a sorted set: waiter id -> arrival ms.
-- KEYS[4]  the fair queue's liveness  <prefix>:{<resource>}:qexp, a hash: waiter id -> the ms
--            after which the entry is stale (its lockd stopped refreshing it).
-- ARGV[1]  token of the caller
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  owner (free text, no control characters)
-- ARGV[4]  limit: 1 for a mutex, more for a semaphore
-- ARGV[5]  fair waiter id, or '' when not waiting fairly (its entry stays live QUEUE_TTL ms
--            without a refresh: common.lua)
-- ARGV[6]  the resource name (for events and wake-ups)
-- ARGV[7]  '1' when the caller waits for the lock (so the lease is marked w), '0' otherwise
-- ARGV[8]  the Session stream that binds the lease, recorded as its k field (see KEYS[1]); ''
--            for a plain Acquire, which clears the field on a re-acquire
-- ARGV[9], ARGV[10], ...  label name, label value, ... (pairs, possibly none)
--
-- Publishes, besides the Watch event (only while watched: common.lua), on RELEASED when a fair
-- waiter is granted ("<resource>\n<next fair queue head or empty>"), so that waiters queued behind
-- it (on any lockd) look again and learn when its lease ends; so does a re-acquire that shortens
-- a lease waiters have seen.
--
-- Fencing tokens: max(last token + 1, Redis TIME in microseconds). The counter alone would
-- restart at 1 after Redis loses it (a restart without persistence, a failover to a lagging
-- replica, an eviction); the clock keeps tokens above those given before, provided Redis's
-- clock never steps back by more than GRACE ms (nor, across a failover, lags the old
-- primary's by more than the failover took). Microseconds since 1970 stay below 2^53, so a Lua
-- number holds them exactly. A mutex granted with no counter key gets exactly Redis's time in
-- microseconds, so once a lease of at least GRACE ms has ended, the clock alone is past its
-- token, even after a backward step shorter than that: such a lease needs no counter key.
--
-- A holder is described as: fencing token, acquired-at, remaining ms, owner, 2 x number of
-- labels, then the label names and values.
-- Returns, with now = Redis TIME in ms:
--   {GRANTED, fencing token, now, new}
--                                   granted (new = 1); also when ARGV[1] already holds it
--                                   (new = 0), in which case the TTL is refreshed and the
--                                   fencing token kept
--   {BUSY, now, retry ms, [holder]} not granted: the ms until a retry may succeed (the first
--                                   lease ends, or the fair queue's head goes stale), -1 if
--                                   unknown, and the first holder when there is one
--   {LIMIT_MISMATCH, limit}         the resource exists with another limit (mutex vs semaphore)
local now, now_s, now_us = clock()
local token, ttl, limit, waiter = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4]), ARGV[5]
local waiting = ARGV[7] == '1'
local renewer = ARGV[8]

-- The live head of the fair queue and the ms when it goes stale, dropping entries whose lockd
-- stopped refreshing them.
local function queue_head()
  -- Most resources have no queue: EXISTS costs Redis a third of what ZRANGE of a missing key does.
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return nil, nil
  end
  while true do
    local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if not head then
      return nil, nil
    end
    local stale = tonumber(redis.call('HGET', KEYS[4], head) or '0')
    if stale > now then
      return head, stale
    end
    redis.call('ZREM', KEYS[3], head)
    redis.call('HDEL', KEYS[4], head)
  end
end

-- Whether the caller may take a free slot, given the fair queue, and if not, when the head
-- that blocks it goes stale.
local function queue_allows()
  local head, stale = queue_head()
  return head == nil or head == waiter, stale
end

-- A fair waiter that is not granted joins the queue, or refreshes its place in it.
local function enqueue()
  if waiter ~= '' then
    local qttl = QUEUE_TTL
    redis.call('ZADD', KEYS[3], 'NX', now, waiter)
    redis.call('HSET', KEYS[4], waiter, now + qttl)
    redis.call('PEXPIRE', KEYS[3], qttl * 2)
    redis.call('PEXPIRE', KEYS[4], qttl * 2)
  end
end

local function leave_queue()
  if waiter ~= '' then
    redis.call('ZREM', KEYS[3], waiter)
    redis.call('HDEL', KEYS[4], waiter)
  end
end

-- A fair waiter was granted: the waiters it blocked (fair ones behind it, and plain ones that
-- the queue held back) only know when its queue entry would go stale, not when its lease ends.
-- Wake them, naming the next head, so they look again and arm a timer for the lease.
local function granted_from_queue()
  if waiter ~= '' then
    local next_head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    redis.call('PUBLISH', RELEASED, ARGV[6] .. '\n' .. (next_head or ''))
  end
end

-- The next fencing token, as a number and as a string. For a mutex lease of `mutex_ttl` ms,
-- KEYS[2] keeps it as common.lua's keep_fence says (it exists already when it was read here);
-- for a semaphore (no `mutex_ttl`), KEYS[2] always does, and the caller sets its expiry through
-- set_lifetime.
local function next_fence(mutex_ttl)
  local last = redis.call('GET', KEYS[2])
  local fence = math.max(tonumber(last or '0') + 1, tonumber(now_us))
  local fence_s = string.format('%.0f', fence)
  if not mutex_ttl then
    redis.call('SET', KEYS[2], fence_s)
  elseif last or mutex_ttl < GRACE or watched() then
    redis.call('SET', KEYS[2], fence_s, 'PX', mutex_ttl + GRACE)
  end
  return fence, fence_s
end

-- The Watch event, published only while someone listens (common.lua's watched).
local function event(kind, owner, fence_s, expires)
  if not watched() then
    return
  end
  redis.call('PUBLISH', EVENTS, kind .. '\n' .. ARGV[6] .. '\n' .. owner .. '\n' .. fence_s .. '\n' .. now_s .. '\n' .. expires)
end

-- Records the binding Session stream as the renewer field `field` of a re-acquired lease, or
-- clears the field for a plain re-acquire (see KEYS[1]).
local function set_renewer(field)
  if renewer == '' then
    redis.call('HDEL', KEYS[1], field)
  else
    redis.call('HSET', KEYS[1], field, renewer)
  end
end

-- A waiting caller that is not granted marks the lease, so its release wakes the waiters.
local function mark_waited()
  if waiting then
    redis.call('HSET', KEYS[1], 'w', 1)
  end
end

local function labels_from_argv()
  local labels = {}
  for i = 9, #ARGV do
    labels[#labels + 1] = ARGV[i]
  end
  return labels
end

-- A free resource has no lock hash: EXISTS costs Redis a quarter of what HMGET of a missing key
-- does. The fields are read only when there is something to read.
local held = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  held = redis.call('HMGET', KEYS[1], 't', 'f', 'a', 'o', 'r', 'n')
end
local existing = held[6]
local sem = nil
if existing then
  -- A semaphore: drop its expired holders first. One without live holders is gone, and the
  -- name is free for either kind.
  sem = settle_semaphore(KEYS[1], now, token)
  set_lifetime(KEYS[1], KEYS[2], sem.latest, now)
  if sem.count == 0 then
    existing = nil
  end
end

if limit == 1 then
  if existing then
    return {LIMIT_MISMATCH, tonumber(existing)}
  end
  if held[1] then
    if held[1] == token and not held[5] then
      if ttl < redis.call('PTTL', KEYS[1]) then
        shortened(KEYS[1], KEYS[3], ARGV[6])
      end
      redis.call('PEXPIRE', KEYS[1], ttl)
      keep_fence(KEYS[2], held[2], ttl)
      set_renewer('k')
      leave_queue()
      event('E', held[4], held[2], now + ttl)
      return {GRANTED, tonumber(held[2]), now, 0}
    end
    local remaining = redis.call('PTTL', KEYS[1])
    enqueue()
    mark_waited()
    local reply = {BUSY, now, remaining, tonumber(held[2]), tonumber(held[3]), remaining, held[4], 0}
    local fields = redis.call('HGETALL', KEYS[1])
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'l:' then
        reply[#reply + 1] = string.sub(fields[i], 3)
        reply[#reply + 1] = fields[i + 1]
        reply[8] = reply[8] + 2
      end
    end
    return reply
  end
  local allowed, stale = queue_allows()
  if not allowed then
    enqueue()
    return {BUSY, now, stale - now}
  end
  leave_queue()
  local fence, fence_s = next_fence(ttl)
  local hash = {'t', token, 'o', ARGV[3], 'f', fence_s, 'a', now_s}
  if renewer ~= '' then
    hash[#hash + 1] = 'k'
    hash[#hash + 1] = renewer
  end
  if waiting then
    -- Other waiters may still be queued behind this one.
    hash[#hash + 1] = 'w'
    hash[#hash + 1] = '1'
  end
  for i = 9, #ARGV, 2 do
    hash[#hash + 1] = 'l:' .. ARGV[i]
    hash[#hash + 1] = ARGV[i + 1]
  end
  redis.call('HSET', KEYS[1], unpack(hash))
  -- ARGV[2] rather than ttl: Redis would format a Lua number with printf.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  event('A', ARGV[3], fence_s, now + ttl)
  granted_from_queue()
  return {GRANTED, fence, now, 1}
end

-- A semaphore.
if not existing and redis.call('EXISTS', KEYS[1]) == 1 then
  return {LIMIT_MISMATCH, 1}
end
if existing and tonumber(existing) ~= limit then
  return {LIMIT_MISMATCH, tonumber(existing)}
end
sem = sem or {count = 0, latest = 0, others = 0, h = {}}
local lingering = sem.mine and sem.h['r:' .. token]
if sem.mine and not lingering then
  -- The caller holds a slot already: refresh it. A lease released with a minimum hold is not
  -- granted again (as for a mutex); it falls through to the busy answer.
  if now + ttl < sem.mine then
    shortened(KEYS[1], KEYS[3], ARGV[6])
  end
  redis.call('HSET', KEYS[1], 'e:' .. token, now + ttl)
  set_renewer('k:' .. token)
  set_lifetime(KEYS[1], KEYS[2], math.max(sem.others, now + ttl), now)
  leave_queue()
  local fence_s = sem.h['f:' .. token]
  event('E', sem.h['o:' .. token], fence_s, now + ttl)
  return {GRANTED, tonumber(fence_s), now, 0}
end
local allowed, stale = queue_allows()
if not lingering and sem.count < limit and allowed then
  leave_queue()
  local fence, fence_s = next_fence()
  redis.call('HSET', KEYS[1], 'n', limit, 'f:' .. token, fence_s, 'a:' .. token, now_s,
    'o:' .. token, ARGV[3], 'e:' .. token, now + ttl, 'g:' .. token, cjson.encode(labels_from_argv()))
  if waiting then
    redis.call('HSET', KEYS[1], 'w', 1)
  end
  if renewer ~= '' then
    redis.call('HSET', KEYS[1], 'k:' .. token, renewer)
  end
  set_lifetime(KEYS[1], KEYS[2], math.max(sem.latest, now + ttl), now)
  event('A', ARGV[3], fence_s, now + ttl)
  granted_from_queue()
  return {GRANTED, fence, now, 1}
end
enqueue()
-- When a slot is free, only the fair queue's head stands in the way: retry when it goes stale.
local retry = -1
if sem.count < limit and stale then
  retry = stale - now
elseif sem.soonest then
  retry = sem.soonest - now
end
if sem.count == 0 then
  return {BUSY, now, retry}
end
mark_waited()
local first = sem.first
local tok = first[2]
local labels = cjson.decode(sem.h['g:' .. tok] or '[]')
local reply = {BUSY, now, retry, first[1], tonumber(sem.h['a:' .. tok]), first[3] - now, sem.h['o:' .. tok], #labels}
for i = 1, #labels do
  reply[#reply + 1] = labels[i]
end
return reply
