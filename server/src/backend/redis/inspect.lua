-- inspect.lua: describe the holder of a lock, without its token (IsLocked, GetOwner).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
--
-- Returns {} when free, or
--         {fencing token, acquired-at, now (Redis TIME in ms), remaining ms, owner, name1, value1, ...}
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local t = redis.call('TIME')
local reply = {0, 0, t[1] * 1000 + math.floor(t[2] / 1000), redis.call('PTTL', KEYS[1]), ''}
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  if name == 'f' then
    reply[1] = tonumber(value)
  elseif name == 'a' then
    reply[2] = tonumber(value)
  elseif name == 'o' then
    reply[5] = value
  elseif string.sub(name, 1, 2) == 'l:' then
    reply[#reply + 1] = string.sub(name, 3)
    reply[#reply + 1] = value
  end
end
return reply
