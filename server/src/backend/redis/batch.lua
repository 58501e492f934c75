-- batch.lua: several lock operations in one script call (batch.rs sends it while Redis is busy).
-- scripts.rs builds the script: common.lua, then acquire.lua, release.lua and extend.lua, each
-- wrapped as a function of its own KEYS and ARGV (OPS.a, OPS.r and OPS.e), then this file. The
-- operations run one after the other, each as its own script call would, and Redis's clock and
-- the events channel's subscribers (common.lua's watched) are read once for them all: the whole
-- batch runs at one instant, as a single script does.
--
-- KEYS       every operation's keys: the first operation's, then the second's, ...
-- ARGV[1]    the number of operations
-- ARGV[2..]  per operation: its script ('a' acquire, 'r' release, 'e' extend), its number of
--              keys, its number of arguments, then its arguments (see each script's header)
--
-- Returns one reply per operation, in order: that script's own reply, or {BATCH_ERROR, message}
-- when the operation raised an error (the operations after it still run).
local BATCH_ERROR = -100

local read_clock, read = clock, nil
clock = function()
  if not read then
    read = {read_clock()}
  end
  return read[1], read[2], read[3]
end

local out = {}
local k, a = 0, 2
for i = 1, tonumber(ARGV[1]) do
  local op, nkeys, nargs = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  -- Table constructors from unpack allocate each table once, at its size.
  local keys = {unpack(KEYS, k + 1, k + nkeys)}
  local args = {unpack(ARGV, a, a + nargs - 1)}
  k, a = k + nkeys, a + nargs
  local ok, reply = pcall(OPS[op], keys, args)
  if ok then
    out[i] = reply
  else
    out[i] = {BATCH_ERROR, type(reply) == 'table' and reply.err or tostring(reply)}
  end
end
return out
