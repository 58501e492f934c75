-- common.lua: settings and helpers shared by acquire.lua, release.lua and extend.lua. scripts.rs
-- puts this file in front of each of them; it reads no KEYS or ARGV itself.
--
-- Reply codes (the first element of each script's reply; reply.rs names them the same way):
local GRANTED, BUSY, LIMIT_MISMATCH = 1, 0, -2 -- acquire.lua
local OK, NOT_HELD, HELD_BY_OTHER = 1, 0, -1 -- release.lua, extend.lua

-- Settings that are the same for every call: scripts.rs writes lockd's own values over these
-- lines when it loads the scripts, so that no call carries them as arguments (Redis spends more
-- on each argument than on most of the Lua that reads it). The values here are lockd's
-- defaults, for reading and for scripts/script-cost.
-- true when lockd talks to a Redis Cluster (see watched below).
local EVENTS_ALWAYS = false
-- The events channel <prefix>:events, where lock events go for Watch.
local EVENTS = 'lockd:events'
-- The wake-up channel <prefix>:released, which every lockd subscribes to once:
-- "<resource>\n<fair queue head or empty>" there makes waiters on any lockd look again.
local RELEASED = 'lockd:released'
-- How long the fencing counter outlives the lease that set it, in ms (see acquire.lua).
local GRACE = 10000
-- How long a fair queue entry stays live without a refresh, in ms.
local QUEUE_TTL = 6000

-- Whether a lock event on EVENTS has anyone to reach. Each lockd subscribes
-- to that channel only while one of its Watch streams is open, so on one Redis (or Sentinel's
-- master, where lockd subscribes) PUBSUB NUMSUB is exact: a script that runs before a lockd's
-- SUBSCRIBE would not have reached it anyway, and every script after it publishes. Building an
-- event and publishing it to nobody costs Redis more than the count does. A Redis Cluster passes
-- every classic PUBLISH to every node, so a node's own count misses subscribers of the others;
-- there, events are always published.
-- No subscriber can come or go while a script runs (nor while a batch of them does: batch.lua),
-- so they are counted once.
local watchers = nil
local function watched()
  if watchers == nil then
    watchers = EVENTS_ALWAYS or redis.call('PUBSUB', 'NUMSUB', EVENTS)[2] > 0
  end
  return watchers
end

-- Redis TIME: now in ms as a number and as a string, and in microseconds as a string. Redis
-- formats every Lua number passed to a command with printf, which costs more than the rest of
-- the arithmetic here, so values only passed on stay strings.
local function clock()
  local t = redis.call('TIME')
  local us = string.rep('0', 6 - #t[2]) .. t[2]
  local ms_s = t[1] .. string.sub(us, 1, 3)
  return tonumber(ms_s), ms_s, t[1] .. us
end

-- Drops the expired holders of the semaphore hash `key` (fields: see acquire.lua) and describes
-- the live ones. Returns a table with
--   count    the number of live holders (lingering ones included: they still hold a slot),
--   latest   their latest expiry (ms), 0 when none,
--   others   the latest expiry among holders other than `token` (ms), 0 when none,
--   soonest  their earliest expiry (ms), nil when none,
--   first    {fencing token, token, expiry} of the holder with the lowest fencing token, or nil,
--   mine     `token`'s expiry when it is a live holder, else nil,
--   h        the hash as read (name -> value), expired holders included.
local function settle_semaphore(key, now, token)
  local fields = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #fields, 2 do
    h[fields[i]] = fields[i + 1]
  end
  local s = {count = 0, latest = 0, others = 0, h = h}
  for i = 1, #fields, 2 do
    local name = fields[i]
    if string.sub(name, 1, 2) == 'e:' then
      local tok, exp = string.sub(name, 3), tonumber(fields[i + 1])
      if exp <= now then
        redis.call('HDEL', key, 'e:' .. tok, 'f:' .. tok, 'a:' .. tok, 'o:' .. tok, 'g:' .. tok,
          'r:' .. tok, 'k:' .. tok)
      else
        s.count = s.count + 1
        s.latest = math.max(s.latest, exp)
        if tok == token then
          s.mine = exp
        else
          s.others = math.max(s.others, exp)
        end
        if s.soonest == nil or exp < s.soonest then
          s.soonest = exp
        end
        local fence = tonumber(h['f:' .. tok])
        if s.first == nil or fence < s.first[1] then
          s.first = {fence, tok, exp}
        end
      end
    end
  end
  return s
end

-- Makes the lock key `key` end at `ends` (ms since epoch), or deletes it when `ends` is 0 (no
-- live holder is left), and lets the fencing counter `fence_key` outlive it by GRACE. The
-- counter must outlive the lock so that an expiry event still reads it, and a little longer so
-- that a backward step of Redis's clock shorter than GRACE cannot hand out a token below one
-- already given (see acquire.lua's next_fence).
local function set_lifetime(key, fence_key, ends, now)
  if ends == 0 then
    redis.call('DEL', key)
    redis.call('PEXPIREAT', fence_key, now + GRACE)
  else
    redis.call('PEXPIREAT', key, ends)
    redis.call('PEXPIREAT', fence_key, ends + GRACE)
  end
end

-- A mutex lease with fencing token `fence_s` now ends `ttl` ms from now. While it lives, its
-- lock hash holds the token; the counter key `fence_key` must hold it too, until GRACE after
-- the lease ends, wherever the hash cannot stand for it:
--   - the lease is shorter than GRACE: after it ends, a backward step of Redis's clock shorter
--     than GRACE could bring the clock below the token (acquire.lua's fencing tokens). A lease
--     of at least GRACE ends later than any such step reaches back;
--   - someone watches (watched): the EXPIRED event of the lease reads the token from the key;
--   - the key exists: it then never holds an older token than the hash.
-- Without the key, a held lock costs Redis one key instead of two. Where the key exists, it holds
-- the lease's token already (every script that writes it while a mutex is held writes that
-- token), so only its expiry moves.
local function keep_fence(fence_key, fence_s, ttl)
  if redis.call('PEXPIRE', fence_key, ttl + GRACE) == 0 and (ttl < GRACE or watched()) then
    redis.call('SET', fence_key, fence_s, 'PX', ttl + GRACE)
  end
end

-- A lease that waiters have seen (the lock hash has w) now ends sooner than they were told: wake
-- them on RELEASED, as release.lua does, so they look again instead of sleeping to the old
-- expiry while a slot may be free. `queue_key` is the resource's fair queue.
local function shortened(lock_key, queue_key, resource)
  if redis.call('HEXISTS', lock_key, 'w') == 1 then
    local head = redis.call('ZRANGE', queue_key, 0, 0)[1]
    redis.call('PUBLISH', RELEASED, resource .. '\n' .. (head or ''))
  end
end

