-- inspect.lua: describe the holders of a lock or semaphore, without tokens (IsLocked,
-- GetOwner, ListLocks).
--
-- KEYS[1]  the lock hash  <prefix>:{<resource>} (see acquire.lua for its fields)
--
-- Returns {} when free, or {now (Redis TIME in ms), limit, holder count, holder, holder, ...},
-- each holder being: fencing token, acquired-at, remaining ms, owner, 2 x number of labels,
-- then the label names and values.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local h = {}
for i = 1, #fields, 2 do
  h[fields[i]] = fields[i + 1]
end
if not h['n'] then
  local reply = {now, 1, 1, tonumber(h['f']), tonumber(h['a']), redis.call('PTTL', KEYS[1]), h['o'], 0}
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'l:' then
      reply[#reply + 1] = string.sub(fields[i], 3)
      reply[#reply + 1] = fields[i + 1]
      reply[8] = reply[8] + 2
    end
  end
  return reply
end
local reply = {now, tonumber(h['n']), 0}
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'e:' then
    local tok, exp = string.sub(fields[i], 3), tonumber(fields[i + 1])
    if exp > now then
      local labels = cjson.decode(h['g:' .. tok] or '[]')
      reply[3] = reply[3] + 1
      reply[#reply + 1] = tonumber(h['f:' .. tok])
      reply[#reply + 1] = tonumber(h['a:' .. tok])
      reply[#reply + 1] = exp - now
      reply[#reply + 1] = h['o:' .. tok]
      reply[#reply + 1] = #labels
      for j = 1, #labels do
        reply[#reply + 1] = labels[j]
      end
    end
  end
end
if reply[3] == 0 then
  return {}
end
return reply
