-- acquire.lua: one attempt to take a lock or a semaphore slot (Backend::acquire).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>}. Its TTL is that of its longest lease.
--            A mutex has the fields t = token (the secret), o = owner, f = fencing token,
--            a = acquired-at (ms since epoch), l:<name> = one field per label, and r = 1 once
--            released with a minimum hold (the lease then only waits out its TTL).
--            A semaphore has n = its limit and, per holder token T: f:T, a:T, o:T, e:T (expiry,
--            ms since epoch), g:T (labels, cjson array name1, value1, ...), r:T (as above).
--            Both may have w = 1: a waiting request saw this lease, so its release must wake
--            waiters (release.lua publishes a wake-up only then, or when a fair queue exists).
-- KEYS[2]  the fencing counter  <prefix>:{<resource>}:fence, an integer that never expires.
-- KEYS[3]  the fair queue  <prefix>:{<resource>}:queue, a sorted set: waiter id -> arrival ms.
-- KEYS[4]  the fair queue's liveness  <prefix>:{<resource>}:qexp, a hash: waiter id -> the ms
--            after which the entry is stale (its lockd stopped refreshing it).
-- ARGV[1]  token of the caller
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  owner (free text, no control characters)
-- ARGV[4]  limit: 1 for a mutex, more for a semaphore
-- ARGV[5]  fair waiter id, or '' when not waiting fairly
-- ARGV[6]  how long a fair queue entry stays live without a refresh, in ms
-- ARGV[7]  the events channel <prefix>:events (for Watch)
-- ARGV[8]  the resource name (for the event)
-- ARGV[9]  '1' when the caller waits for the lock (so the lease is marked w), '0' otherwise
-- ARGV[10], ARGV[11], ...  label name, label value, ... (pairs, possibly none)
--
-- A holder is described as: fencing token, acquired-at, remaining ms, owner, 2 x number of
-- labels, then the label names and values.
-- Returns, with now = Redis TIME in ms:
--   {1, fencing token, now}      granted; also when ARGV[1] already holds it, in which case the
--                                TTL is refreshed and the fencing token kept
--   {0, now, limit, holders, retry ms, [holder]}
--                                not granted: the holder count, the ms until the first lease
--                                ends (-1 if none), and the first holder when there is one
--   {-2, limit}                  the resource exists with another limit (mutex vs semaphore)
local t = redis.call('TIME')
-- now in ms, also as a string: Redis formats every Lua number passed to a command with printf,
-- which costs more than the rest of the arithmetic here, so values only passed on stay strings.
local us = t[2]
local now_s = t[1] .. string.sub(string.rep('0', 6 - #us) .. us, 1, 3)
local now = tonumber(now_s)
local token, ttl, limit, waiter = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4]), ARGV[5]
local waiting = ARGV[9] == '1'

-- The live head of the fair queue, dropping entries whose lockd stopped refreshing them.
local function queue_head()
  while true do
    local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if not head then
      return nil
    end
    if tonumber(redis.call('HGET', KEYS[4], head) or '0') > now then
      return head
    end
    redis.call('ZREM', KEYS[3], head)
    redis.call('HDEL', KEYS[4], head)
  end
end

-- May the caller take a free slot, given the fair queue?
local function queue_allows()
  local head = queue_head()
  return head == nil or head == waiter
end

-- A fair waiter that is not granted joins the queue, or refreshes its place in it.
local function enqueue()
  if waiter ~= '' then
    local qttl = tonumber(ARGV[6])
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

local function event(kind, owner, fence, expires)
  redis.call('PUBLISH', ARGV[7], kind .. '\n' .. ARGV[8] .. '\n' .. owner .. '\n' .. fence .. '\n' .. now_s .. '\n' .. expires)
end

-- A waiting caller that is not granted marks the lease, so its release wakes the waiters.
local function mark_waited()
  if waiting then
    redis.call('HSET', KEYS[1], 'w', 1)
  end
end

local function labels_from_argv()
  local labels = {}
  for i = 10, #ARGV do
    labels[#labels + 1] = ARGV[i]
  end
  return labels
end

local held = redis.call('HMGET', KEYS[1], 't', 'f', 'a', 'o', 'r', 'n')
local existing = held[6]
if limit == 1 then
  if existing then
    return {-2, tonumber(existing)}
  end
  if held[1] then
    if held[1] == token and not held[5] then
      redis.call('PEXPIRE', KEYS[1], ttl)
      leave_queue()
      event('E', held[4], held[2], now + ttl)
      return {1, tonumber(held[2]), now}
    end
    local remaining = redis.call('PTTL', KEYS[1])
    enqueue()
    mark_waited()
    local reply = {0, now, 1, 1, remaining, tonumber(held[2]), tonumber(held[3]), remaining, held[4], 0}
    local fields = redis.call('HGETALL', KEYS[1])
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'l:' then
        reply[#reply + 1] = string.sub(fields[i], 3)
        reply[#reply + 1] = fields[i + 1]
        reply[10] = reply[10] + 2
      end
    end
    return reply
  end
  if not queue_allows() then
    enqueue()
    return {0, now, 1, 0, -1}
  end
  leave_queue()
  local fence = redis.call('INCR', KEYS[2])
  local fence_s = tostring(fence)
  local hash = {'t', token, 'o', ARGV[3], 'f', fence_s, 'a', now_s}
  if waiting then
    -- Other waiters may still be queued behind this one.
    hash[#hash + 1] = 'w'
    hash[#hash + 1] = '1'
  end
  for i = 10, #ARGV, 2 do
    hash[#hash + 1] = 'l:' .. ARGV[i]
    hash[#hash + 1] = ARGV[i + 1]
  end
  redis.call('HSET', KEYS[1], unpack(hash))
  -- ARGV[2] rather than ttl: Redis would format a Lua number with printf.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  event('A', ARGV[3], fence_s, now + ttl)
  return {1, fence, now}
end

-- A semaphore.
if existing == false and redis.call('EXISTS', KEYS[1]) == 1 then
  return {-2, 1}
end
if existing and tonumber(existing) ~= limit then
  return {-2, tonumber(existing)}
end
-- Drop expired holders; find the caller, the longest expiry and the first holder.
local fields = redis.call('HGETALL', KEYS[1])
local count, latest, soonest, first = 0, 0, nil, nil
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 2) == 'e:' then
    local tok, exp = string.sub(name, 3), tonumber(fields[i + 1])
    if exp <= now then
      redis.call('HDEL', KEYS[1], 'e:' .. tok, 'f:' .. tok, 'a:' .. tok, 'o:' .. tok, 'g:' .. tok, 'r:' .. tok)
    else
      count = count + 1
      latest = math.max(latest, exp)
      if soonest == nil or exp < soonest then
        soonest = exp
      end
      local fence = tonumber(redis.call('HGET', KEYS[1], 'f:' .. tok))
      if first == nil or fence < first[1] then
        first = {fence, tok, exp}
      end
    end
  end
end
local mine = redis.call('HMGET', KEYS[1], 'e:' .. token, 'f:' .. token, 'o:' .. token, 'r:' .. token)
if mine[1] and tonumber(mine[1]) > now and not mine[4] then
  redis.call('HSET', KEYS[1], 'e:' .. token, now + ttl)
  redis.call('PEXPIREAT', KEYS[1], math.max(latest, now + ttl))
  leave_queue()
  event('E', mine[3], mine[2], now + ttl)
  return {1, tonumber(mine[2]), now}
end
if count < limit and queue_allows() then
  leave_queue()
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'n', limit, 'f:' .. token, fence, 'a:' .. token, now_s,
    'o:' .. token, ARGV[3], 'e:' .. token, now + ttl, 'g:' .. token, cjson.encode(labels_from_argv()))
  if waiting then
    redis.call('HSET', KEYS[1], 'w', 1)
  end
  redis.call('PEXPIREAT', KEYS[1], math.max(latest, now + ttl))
  event('A', ARGV[3], fence, now + ttl)
  return {1, fence, now}
end
enqueue()
if count == 0 then
  return {0, now, limit, 0, -1}
end
mark_waited()
local tok = first[2]
local h = redis.call('HMGET', KEYS[1], 'a:' .. tok, 'o:' .. tok, 'g:' .. tok)
local labels = cjson.decode(h[3] or '[]')
local reply = {0, now, limit, count, soonest - now, first[1], tonumber(h[1]), first[3] - now, h[2], #labels}
for i = 1, #labels do
  reply[#reply + 1] = labels[i]
end
return reply
