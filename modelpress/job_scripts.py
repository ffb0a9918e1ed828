"""The Lua scripts of the job store (``modelpress.jobs.JobStore``): each move of a job, with the
indexes it touches, is one script, so it is written at once or not at all.

The scripts build the tenant keys themselves from the record (see ``modelpress.jobs`` for the keys),
which is fine on one Redis; a cluster would need them passed as KEYS.
"""

# Every script reads the clock of the Redis server, not of the caller, so heartbeats written by
# one machine and judged by another compare like with like.
NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# Whether a running job's supervisor is gone: no beat for ``stale`` seconds, counted from the
# later of its last beat and the moment Redis itself started (after a Redis restart every
# supervisor gets a full period to reconnect before anyone takes its job over).
STALE = """
local function beat_is_stale(id, now, stale, redis_started)
  local beat = tonumber(redis.call('ZSCORE', 'modelpress:running', id) or '0')
  return now - math.max(beat, redis_started) >= stale
end
"""

# KEYS[1] job, KEYS[2] global index. ARGV[1] id, ARGV[2] tenant, ARGV[3] active-job limit,
# ARGV[4] method, ARGV[5] bytes uploaded, ARGV[6] idempotency key name ('' for none), ARGV[7] its
# claim (JSON), ARGV[8] its TTL, ARGV[9..] field, value pairs.
# Returns {'created'}, {'quota'} or {'replay', earlier claim}. The idempotency claim and the record
# are written together, so a claim never exists without its job (nothing to release on a crash).
CREATE_SCRIPT = (
    NOW
    + """
if ARGV[6] ~= '' then
  local earlier = redis.call('GET', ARGV[6])
  if earlier then return {'replay', earlier} end
end
local active = 'modelpress:tenant:' .. ARGV[2] .. ':active'
if redis.call('SCARD', active) >= tonumber(ARGV[3]) then
  -- The quota counts only records that are really queued or running: drop anything else.
  for _, member in ipairs(redis.call('SMEMBERS', active)) do
    local state = redis.call('HGET', 'modelpress:job:' .. member, 'state')
    if not state or (state ~= '"queued"' and state ~= '"running"') then redis.call('SREM', active, member) end
  end
  if redis.call('SCARD', active) >= tonumber(ARGV[3]) then return {'quota'} end
end
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'gen', 1, 'enqueued_epoch', server_now(), 'deliveries', 0, 'attempt', 0)
if ARGV[6] ~= '' then redis.call('SET', ARGV[6], ARGV[7], 'EX', tonumber(ARGV[8])) end
redis.call('HINCRBY', 'modelpress:metrics', 'submitted|' .. ARGV[4], 1)
redis.call('HINCRBY', 'modelpress:metrics', 'bytes_uploaded', ARGV[5])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', 'modelpress:tenant:' .. ARGV[2] .. ':jobs', 0, ARGV[1])
redis.call('SADD', active, ARGV[1])
redis.call('SADD', 'modelpress:queued', ARGV[1])
return {'created'}
"""
)

# A delivery takes the job: one atomic step, so of two deliveries that both find a stale job
# exactly one wins. KEYS[1] job. ARGV[1] id, ARGV[2] the message's generation ('' = any),
# ARGV[3] stale seconds, ARGV[4] when Redis started (server epoch), ARGV[5] started_at (JSON),
# ARGV[6] the most running jobs of one tenant (0: no cap).
# Returns {'claimed', attempt, deliveries} or {why not, state}. 'tenant-busy': the job's tenant
# already runs its cap of jobs; the job stays queued, its deliveries untouched, and its enqueue
# time is renewed (the caller sends it again shortly, so the reconciler must not).
CLAIM_SCRIPT = (
    NOW
    + STALE
    + """
local raw = redis.call('HMGET', KEYS[1], 'state', 'gen', 'deliveries', 'attempt', 'tenant')
if not raw[1] then return {'missing', 'missing'} end
local state = cjson.decode(raw[1])
if state ~= 'queued' and state ~= 'running' then return {'final', state} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(raw[2] or '1') then return {'stale-message', state} end
local now = server_now()
if state == 'running' and not beat_is_stale(ARGV[1], now, tonumber(ARGV[3]), tonumber(ARGV[4])) then
  return {'busy', state}
end
local running = 'modelpress:tenant:' .. cjson.decode(raw[5] or '"public"') .. ':running'
local cap = tonumber(ARGV[6])
if state == 'queued' and cap > 0 and redis.call('SCARD', running) >= cap then
  -- Count only records that are really running (a deleted or finished one frees its slot).
  for _, member in ipairs(redis.call('SMEMBERS', running)) do
    if redis.call('HGET', 'modelpress:job:' .. member, 'state') ~= '"running"' then redis.call('SREM', running, member) end
  end
  if redis.call('SCARD', running) >= cap then
    redis.call('HSET', KEYS[1], 'enqueued_epoch', now)
    return {'tenant-busy', state}
  end
end
redis.call('SADD', running, ARGV[1])
local deliveries = tonumber(raw[3] or '0') + 1
local attempt = tonumber(raw[4] or '0') + 1
redis.call('HSET', KEYS[1], 'deliveries', deliveries, 'attempt', attempt, 'state', '"running"',
           'stage', state == 'queued' and '"starting"' or '"restarting"', 'progress', '0.0')
if state == 'queued' then redis.call('HSET', KEYS[1], 'started_at', ARGV[5]) end
redis.call('SREM', 'modelpress:queued', ARGV[1])
redis.call('ZADD', 'modelpress:running', now, ARGV[1])
return {'claimed', attempt, deliveries}
"""
)

# The supervisor's beat, fenced: writes progress fields and the heartbeat only while the job is
# running under this attempt. KEYS[1] job. ARGV[1] id, ARGV[2] attempt, ARGV[3..] field, value pairs.
# Returns 0 when this attempt no longer owns the job, 2 when a cancel was asked for, else 1.
BEAT_SCRIPT = (
    NOW
    + """
local raw = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'cancel_requested')
if not raw[1] or raw[1] ~= '"running"' or tonumber(raw[2]) ~= tonumber(ARGV[2]) then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', 'modelpress:running', server_now(), ARGV[1])
if raw[3] == 'true' then return 2 end
return 1
"""
)

# A final state, fenced: from ``running`` only by the attempt that owns the job, from ``queued``
# (a cancel) only without an attempt. The webhook event joins the outbox in the same step, so a
# final state is never recorded without its event. KEYS[1] job. ARGV[1] id, ARGV[2] new state,
# ARGV[3] attempt ('' for none), ARGV[4] now (epoch seconds), ARGV[5..] field, value pairs.
# Returns the state after the call.
FINISH_SCRIPT = (
    NOW
    + """
local raw = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'tenant', 'spec', 'created_epoch', 'callback_url')
if not raw[1] then return false end
local current = cjson.decode(raw[1])
local fenced = ARGV[3] ~= ''
if fenced and (current ~= 'running' or tonumber(raw[2]) ~= tonumber(ARGV[3])) then return current end
if not fenced and current ~= 'queued' then return current end
local target = ARGV[2]
redis.call('HSET', KEYS[1], 'state', cjson.encode(target))
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local tenant = cjson.decode(raw[3] or '"public"')
redis.call('ZREM', 'modelpress:running', ARGV[1])
redis.call('SREM', 'modelpress:queued', ARGV[1])
redis.call('SREM', 'modelpress:tenant:' .. tenant .. ':active', ARGV[1])
redis.call('SREM', 'modelpress:tenant:' .. tenant .. ':running', ARGV[1])
redis.call('ZADD', 'modelpress:finished', ARGV[4], ARGV[1])
if raw[6] and raw[6] ~= 'null' then
  local event = 'msg_' .. ARGV[1] .. '_' .. target
  redis.call('HSET', 'modelpress:outbox:events', event, cjson.encode({job_id = ARGV[1], state = target, tries = 0}))
  redis.call('ZADD', 'modelpress:outbox', server_now(), event)
end
local method = raw[4] and cjson.decode(raw[4]).method or 'unknown'
local metrics = 'modelpress:metrics'
redis.call('HINCRBY', metrics, 'finished|' .. target .. '|' .. method, 1)
local created = tonumber(raw[5] or ARGV[4])
local duration = math.max(0, tonumber(ARGV[4]) - created)
for _, bound in ipairs({1, 5, 15, 60, 300, 900, 1800, 3600, 14400}) do
  if duration <= bound then redis.call('HINCRBY', metrics, 'duration_bucket|' .. method .. '|' .. bound, 1) end
end
redis.call('HINCRBY', metrics, 'duration_count|' .. method, 1)
redis.call('HINCRBYFLOAT', metrics, 'duration_sum|' .. method, duration)
return target
"""
)

# Sets fields only while the job is in one of the given states (never creates a deleted record).
# KEYS[1] job key; ARGV[1] comma-separated states; ARGV[2..] field, value pairs. Returns 1 if written.
UPDATE_IF_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
current = cjson.decode(current)
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == current then
    for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return 1
  end
end
return 0
"""

# The reconciler re-sends a job whose message is gone: a queued job, or a running one whose
# supervisor stopped beating, last sent more than ARGV[3] seconds ago. Compare-and-set on the
# generation the caller saw, so of several workers exactly one re-sends per loss.
# KEYS[1] job. ARGV[1] id, ARGV[2] generation seen, ARGV[3] bound (s), ARGV[4] stale (s),
# ARGV[5] when Redis started. Returns the new generation, or 0.
RESEND_SCRIPT = (
    NOW
    + STALE
    + """
local raw = redis.call('HMGET', KEYS[1], 'state', 'gen', 'enqueued_epoch')
if not raw[1] or tonumber(raw[2] or '1') ~= tonumber(ARGV[2]) then return 0 end
local now = server_now()
if now - math.max(tonumber(raw[3] or '0'), tonumber(ARGV[5])) < tonumber(ARGV[3]) then return 0 end
local state = cjson.decode(raw[1])
if state == 'running' then
  if not beat_is_stale(ARGV[1], now, tonumber(ARGV[4]), tonumber(ARGV[5])) then return 0 end
elseif state ~= 'queued' then
  return 0
end
local gen = tonumber(ARGV[2]) + 1
redis.call('HSET', KEYS[1], 'gen', gen, 'enqueued_epoch', now)
return gen
"""
)

# KEYS[1] job. ARGV[1] id. Removes the record and every index entry.
DELETE_SCRIPT = """
local tenant = cjson.decode(redis.call('HGET', KEYS[1], 'tenant') or '"public"')
redis.call('DEL', KEYS[1])
redis.call('ZREM', 'modelpress:jobs', ARGV[1])
redis.call('ZREM', 'modelpress:tenant:' .. tenant .. ':jobs', ARGV[1])
redis.call('SREM', 'modelpress:tenant:' .. tenant .. ':active', ARGV[1])
redis.call('SREM', 'modelpress:tenant:' .. tenant .. ':running', ARGV[1])
redis.call('SREM', 'modelpress:queued', ARGV[1])
redis.call('ZREM', 'modelpress:running', ARGV[1])
redis.call('ZREM', 'modelpress:finished', ARGV[1])
return 1
"""

# Takes the next due webhook event for ``lease`` seconds (a dispatcher that dies mid-delivery
# loses the lease, and another takes the event over). ARGV[1] lease seconds. Returns {id, JSON} or false.
LEASE_EVENT_SCRIPT = (
    NOW
    + """
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', 'modelpress:outbox', '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then return false end
local event = redis.call('HGET', 'modelpress:outbox:events', due[1])
if not event then redis.call('ZREM', 'modelpress:outbox', due[1]); return false end
redis.call('ZADD', 'modelpress:outbox', now + tonumber(ARGV[1]), due[1])
return {due[1], event}
"""
)

# After a failed try: count it and schedule the next one after ARGV[2] seconds, or drop the event
# once ARGV[3] tries are spent. ARGV[1] event id. Returns the tries so far.
RETRY_EVENT_SCRIPT = (
    NOW
    + """
local raw = redis.call('HGET', 'modelpress:outbox:events', ARGV[1])
if not raw then return 0 end
local event = cjson.decode(raw)
event.tries = (event.tries or 0) + 1
if event.tries >= tonumber(ARGV[3]) then
  redis.call('HDEL', 'modelpress:outbox:events', ARGV[1])
  redis.call('ZREM', 'modelpress:outbox', ARGV[1])
else
  redis.call('HSET', 'modelpress:outbox:events', ARGV[1], cjson.encode(event))
  redis.call('ZADD', 'modelpress:outbox', server_now() + tonumber(ARGV[2]), ARGV[1])
end
return event.tries
"""
)
