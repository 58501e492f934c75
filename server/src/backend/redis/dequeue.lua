-- dequeue.lua: a fair waiter gives up and leaves the queue (Backend::leave_queue).
--
-- KEYS[1]  the fair queue  <prefix>:{<resource>}:queue (see acquire.lua)
-- KEYS[2]  the fair queue's liveness hash  <prefix>:{<resource>}:qexp
-- ARGV[1]  the waiter id
-- ARGV[2]  the wake-up channel <prefix>:released
-- ARGV[3]  the resource name
--
-- When the leaving waiter was at the head, publishes "<resource>\n<new head>" on ARGV[2] so the
-- next waiter tries at once. Returns 1 if the waiter was queued, 0 otherwise.
local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 1 and head == ARGV[1] then
  local next_head = redis.call('ZRANGE', KEYS[1], 0, 0)[1] or ''
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. '\n' .. next_head)
end
return removed
