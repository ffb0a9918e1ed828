"""Job records in Redis and the only state moves a job may make.

A record is a Redis hash ``modelpress:job:<id>`` whose values are JSON. Every state change
goes through one Lua script, so a move and the indexes it touches are written atomically
(a cancel and a finish can race; exactly one wins). Indexes:

- ``modelpress:jobs`` and ``modelpress:tenant:<t>:jobs``: sorted sets, all scores 0, so
  members sort by id, and ULIDs sort by creation time (newest-first listing, id as cursor);
- ``modelpress:tenant:<t>:active``: the tenant's queued and running jobs (quota);
- ``modelpress:tenant:<t>:running``: the tenant's running jobs (the cap on running jobs);
- ``modelpress:queued``: jobs not yet taken by a worker (the reconciler);
- ``modelpress:running``: running jobs scored by their supervisor's last heartbeat (server clock);
- ``modelpress:outbox`` and ``modelpress:outbox:events``: webhook events waiting to be delivered;
- ``modelpress:finished``: finished jobs scored by finish time (retention).

Fencing: every delivery that takes a job (``claim``) gets the next attempt number, stored in
the record. Every later write of that delivery (heartbeat and progress, final state) carries
it and is refused once another delivery has taken over, so a superseded supervisor can
change nothing. Each message carries the job's enqueue generation; the reconciler re-sends
a job whose message is gone by bumping it (compare-and-set), and older messages are dropped.

The scripts build the tenant keys themselves from the record, which is fine on one Redis
server (not on Redis Cluster).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, Iterable, NamedTuple

import redis

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
# queued -> running -> succeeded | failed; queued | running -> cancelled. Nothing else.
MOVES: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

log = logging.getLogger("modelpress.jobs")

# Every Redis client of the service (API, supervisor, reaper, Celery's broker transport): a
# half-open connection fails a call within seconds instead of freezing the caller's loop.
REDIS_TIMEOUTS = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0, "health_check_interval": 15}


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_keepalive=True, **REDIS_TIMEOUTS)

_PREFIX = "modelpress:"
_INDEX = _PREFIX + "jobs"
_RUNNING = _PREFIX + "running"
_QUEUED = _PREFIX + "queued"
_FINISHED = _PREFIX + "finished"
_OUTBOX = _PREFIX + "outbox"  # webhook events: sorted set scored by when each is due
_OUTBOX_EVENTS = _PREFIX + "outbox:events"  # event id -> JSON
_FILES_LEFT = _PREFIX + "files-left"  # ids of deleted jobs whose files the store did not remove (the reaper retries)
_UPLOADING = _PREFIX + "uploading"  # ids of jobs whose upload is under way, scored by its last activity

# Every script reads the clock of the Redis server, not of the caller, so heartbeats written by
# one machine and judged by another compare like with like.
_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# Whether a running job's supervisor is gone: no beat for ``stale`` seconds, counted from the
# later of its last beat and the moment Redis itself started (after a Redis restart every
# supervisor gets a full period to reconnect before anyone takes its job over).
_STALE = """
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
_CREATE_SCRIPT = _NOW + """
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

# A delivery takes the job: one atomic step, so of two deliveries that both find a stale job
# exactly one wins. KEYS[1] job. ARGV[1] id, ARGV[2] the message's generation ('' = any),
# ARGV[3] stale seconds, ARGV[4] when Redis started (server epoch), ARGV[5] started_at (JSON),
# ARGV[6] the most running jobs of one tenant (0: no cap).
# Returns {'claimed', attempt, deliveries} or {why not, state}. 'tenant-busy': the job's tenant
# already runs its cap of jobs; the job stays queued, its deliveries untouched, and its enqueue
# time is renewed (the caller sends it again shortly, so the reconciler must not).
_CLAIM_SCRIPT = _NOW + _STALE + """
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

# The supervisor's beat, fenced: writes progress fields and the heartbeat only while the job is
# running under this attempt. KEYS[1] job. ARGV[1] id, ARGV[2] attempt, ARGV[3..] field, value pairs.
# Returns 0 when this attempt no longer owns the job, 2 when a cancel was asked for, else 1.
_BEAT_SCRIPT = _NOW + """
local raw = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'cancel_requested')
if not raw[1] or raw[1] ~= '"running"' or tonumber(raw[2]) ~= tonumber(ARGV[2]) then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', 'modelpress:running', server_now(), ARGV[1])
if raw[3] == 'true' then return 2 end
return 1
"""

# A final state, fenced: from ``running`` only by the attempt that owns the job, from ``queued``
# (a cancel) only without an attempt. The webhook event joins the outbox in the same step, so a
# final state is never recorded without its event. KEYS[1] job. ARGV[1] id, ARGV[2] new state,
# ARGV[3] attempt ('' for none), ARGV[4] now (epoch seconds), ARGV[5..] field, value pairs.
# Returns the state after the call.
_FINISH_SCRIPT = _NOW + """
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

# Sets fields only while the job is in one of the given states (never creates a deleted record).
# KEYS[1] job key; ARGV[1] comma-separated states; ARGV[2..] field, value pairs. Returns 1 if written.
_UPDATE_IF_SCRIPT = """
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
_RESEND_SCRIPT = _NOW + _STALE + """
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

# KEYS[1] job. ARGV[1] id. Removes the record and every index entry.
_DELETE_SCRIPT = """
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
_LEASE_EVENT_SCRIPT = _NOW + """
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', 'modelpress:outbox', '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then return false end
local event = redis.call('HGET', 'modelpress:outbox:events', due[1])
if not event then redis.call('ZREM', 'modelpress:outbox', due[1]); return false end
redis.call('ZADD', 'modelpress:outbox', now + tonumber(ARGV[1]), due[1])
return {due[1], event}
"""

# After a failed try: count it and schedule the next one after ARGV[2] seconds, or drop the event
# once ARGV[3] tries are spent. ARGV[1] event id. Returns the tries so far.
_RETRY_EVENT_SCRIPT = _NOW + """
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


def new_job_id(now: float | None = None) -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32, sortable by creation time."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    milliseconds = int((time.time() if now is None else now) * 1000)
    value = (milliseconds << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(alphabet[(value >> shift) & 31] for shift in range(125, -1, -5))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Claim(NamedTuple):
    """What a delivery got: ``outcome`` is 'claimed', or why not ('missing', 'final', 'busy', 'stale-message',
    'tenant-busy')."""

    outcome: str
    state: str | None = None  # the job's state when not claimed
    attempt: int = 0  # the fencing token every later write of this delivery carries
    deliveries: int = 0


class Superseded(Exception):
    """This supervisor's attempt no longer owns the job (taken over, cancelled or deleted)."""


class JobStore:
    """Reads and writes job records; knows nothing of HTTP or Celery."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_CREATE_SCRIPT)
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._beat = client.register_script(_BEAT_SCRIPT)
        self._finish = client.register_script(_FINISH_SCRIPT)
        self._update_if = client.register_script(_UPDATE_IF_SCRIPT)
        self._resend = client.register_script(_RESEND_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)
        self._lease_event = client.register_script(_LEASE_EVENT_SCRIPT)
        self._retry_event = client.register_script(_RETRY_EVENT_SCRIPT)

    def create(self, job: dict[str, Any], max_active: int = 1 << 30, uploaded_bytes: int = 0,
               idempotency: tuple[str, str, str, int] | None = None) -> tuple[str, dict[str, str] | None]:
        """Store a new record (state ``queued``, generation 1) and index it, with its idempotency claim.

        ``idempotency`` is (tenant, key, fingerprint, ttl seconds). Returns ('created', None),
        ('quota', None) when the tenant has ``max_active`` jobs, or ('replay', earlier claim).
        """
        job = {**job, "created_epoch": time.time()}
        key_name, claim, ttl = "", "", 0
        if idempotency is not None:
            tenant, key, fingerprint, ttl = idempotency
            key_name = _idempotency_key(tenant, key)
            claim = json.dumps({"fingerprint": fingerprint, "job_id": job["id"]})
        args: list[Any] = [job["id"], job.get("tenant", "public"), max_active, job["spec"]["method"], int(uploaded_bytes),
                           key_name, claim, ttl]
        for name, value in _encode(job).items():
            args += [name, value]
        answer = [_text(part) for part in self._create(keys=[_key(job["id"]), _INDEX], args=args)]
        if answer[0] == "created":
            log.info("job %s: %s", job["id"], QUEUED, extra={"job_id": job["id"], "state": QUEUED, "event": "transition"})
        return answer[0], (json.loads(answer[1]) if len(answer) > 1 else None)

    def metrics(self) -> dict[str, str]:
        """Counters kept by the scripts: submitted, finished, durations, bytes uploaded."""
        return {_text(k): _text(v) for k, v in self.redis.hgetall(_PREFIX + "metrics").items()}

    def running_count(self) -> int:
        return int(self.redis.zcard(_RUNNING))

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(_key(job_id))
        return _decode(raw) if raw else None

    # ------------------------------------------------------------------ the lifecycle, fenced

    def claim(self, job_id: str, generation: int | None, stale_s: float, max_running: int = 0) -> Claim:
        """Take the job for one delivery: queued -> running, or a takeover of a running job whose
        supervisor is gone. Atomic: of two deliveries that both see a stale job, one wins.

        ``max_running`` (0: none) caps the running jobs of the job's tenant: a queued job over the
        cap is not taken ('tenant-busy') and stays queued for the caller to send again."""
        answer = self._claim(keys=[_key(job_id)], args=[
            job_id, "" if generation is None else int(generation), stale_s, self.redis_started(),
            json.dumps(utc_now()), int(max_running)])
        outcome = _text(answer[0])
        if outcome != "claimed":
            return Claim(outcome, _text(answer[1]))
        log.info("job %s: %s (attempt %s)", job_id, RUNNING, int(answer[1]),
                 extra={"job_id": job_id, "state": RUNNING, "event": "transition"})
        return Claim(outcome, RUNNING, int(answer[1]), int(answer[2]))

    def beat(self, job_id: str, attempt: int, **fields: Any) -> bool:
        """Heartbeat and progress of the attempt that owns the job; True when a cancel was asked for.

        Raises ``Superseded`` when the attempt no longer owns the job.
        """
        args: list[Any] = [job_id, attempt]
        for name, value in _encode(fields).items():
            args += [name, value]
        answer = int(self._beat(keys=[_key(job_id)], args=args))
        if answer == 0:
            raise Superseded(job_id)
        return answer == 2

    def finish(self, job_id: str, state: str, attempt: int | None, **fields: Any) -> str | None:
        """Move to a final state; return the state afterwards (the caller won when it equals ``state``).

        With an attempt: only from ``running`` and only while that attempt owns the job. Without
        one: only from ``queued`` (a cancel before any worker took the job).
        """
        args: list[Any] = [job_id, state, "" if attempt is None else int(attempt), time.time()]
        for name, value in _encode(fields).items():
            args += [name, value]
        result = _text(self._finish(keys=[_key(job_id)], args=args) or b"") or None
        if result == state:
            log.info("job %s: %s", job_id, state, extra={"job_id": job_id, "state": state, "event": "transition"})
        return result

    def update_if(self, job_id: str, states: Iterable[str], **fields: Any) -> bool:
        args: list[str] = [",".join(states)]
        for name, value in _encode(fields).items():
            args += [name, value]
        return bool(self._update_if(keys=[_key(job_id)], args=args))

    def redis_started(self) -> float:
        """When the Redis server started, on its own clock (a restart gives every supervisor a grace period)."""
        info = self.redis.info("server")
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6 - float(info["uptime_in_seconds"])

    # ------------------------------------------------------------------ the reconciler

    def unsettled(self, stale_s: float) -> list[tuple[str, int]]:
        """Jobs that may need a message: queued ones, and running ones whose supervisor stopped
        beating; each with the generation seen (for ``resend``)."""
        seconds, micros = self.redis.time()
        ids = [_text(i) for i in self.redis.smembers(_QUEUED)]
        ids += [_text(i) for i in self.redis.zrangebyscore(_RUNNING, "-inf", seconds + micros / 1e6 - stale_s)]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(_key(job_id), "gen")
            generations = pipe.execute()
        return [(job_id, int(gen)) for job_id, gen in zip(ids, generations) if gen is not None]

    def resend(self, job_id: str, generation: int, bound_s: float, stale_s: float) -> int:
        """Reserve a new message for a job whose last one is gone; the new generation, or 0 if
        the job does not need one (or another worker re-sent it first)."""
        return int(self._resend(keys=[_key(job_id)], args=[job_id, generation, bound_s, stale_s,
                                                             self.redis_started()]))

    def finished_before(self, epoch_s: float) -> list[str]:
        return [_text(i) for i in self.redis.zrangebyscore(_FINISHED, "-inf", epoch_s)]

    # ------------------------------------------------------------------ the webhook outbox

    def lease_event(self, lease_s: float) -> tuple[str, dict[str, Any]] | None:
        """The next due webhook event, held for ``lease_s`` seconds; None when nothing is due."""
        answer = self._lease_event(args=[lease_s])
        return (_text(answer[0]), json.loads(answer[1])) if answer else None

    def event_done(self, event_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(_OUTBOX, event_id)
            pipe.hdel(_OUTBOX_EVENTS, event_id)
            pipe.execute()

    def event_failed(self, event_id: str, retry_in_s: float, max_tries: int) -> int:
        """Count a failed try; schedule the next or drop the event after ``max_tries``. Returns the tries."""
        return int(self._retry_event(args=[event_id, retry_in_s, max_tries]))

    def outbox_size(self) -> int:
        return int(self.redis.zcard(_OUTBOX))

    # ------------------------------------------------------------------ listing and deleting

    def delete(self, job_id: str) -> None:
        self._delete(keys=[_key(job_id)], args=[job_id])

    def files_left(self, job_id: str, removed: bool = False) -> None:
        """Note (or, ``removed``, clear) a deleted job whose files are still to be removed."""
        (self.redis.srem if removed else self.redis.sadd)(_FILES_LEFT, job_id)

    def jobs_with_files_left(self) -> list[str]:
        return sorted(_text(i) for i in self.redis.smembers(_FILES_LEFT))

    # ------------------------------------------------------------------ uploads not yet settled

    def upload_active(self, job_id: str) -> None:
        """A request is writing files for this job id now (when it begins, and as its bytes arrive)."""
        self.redis.zadd(_UPLOADING, {job_id: time.time()})

    def upload_settled(self, job_id: str) -> None:
        """The request recorded the job, or removed what it wrote."""
        self.redis.zrem(_UPLOADING, job_id)

    def uploads_idle_since(self, epoch_s: float) -> list[str]:
        """Uploads neither settled nor active since ``epoch_s``."""
        return [_text(i) for i in self.redis.zrangebyscore(_UPLOADING, "-inf", epoch_s)]

    def states(self, job_ids: Iterable[str]) -> dict[str, str | None]:
        """Each job's state, None for a job with no record (never recorded, or deleted)."""
        ids = list(job_ids)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(_key(job_id), "state")
            found = pipe.execute()
        return {job_id: None if state is None else json.loads(state) for job_id, state in zip(ids, found)}

    def page(self, tenant: str, state: str | None = None, limit: int = 20,
             after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """A tenant's jobs newest first, at most ``limit``, after the id ``after``; and the next cursor."""
        index = f"{_PREFIX}tenant:{tenant}:jobs"
        jobs: list[dict[str, Any]] = []
        cursor = after
        batch = max(limit * 2, 50)
        while len(jobs) < limit:
            upper = f"({cursor}" if cursor else "+"
            ids = self.redis.zrevrangebylex(index, upper, "-", start=0, num=batch)
            if not ids:
                return jobs, None
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(_key(_text(job_id)))
                records = pipe.execute()
            for job_id, raw in zip(ids, records):
                cursor = _text(job_id)
                if not raw:
                    continue
                job = _decode(raw)
                if state is None or job.get("state") == state:
                    jobs.append(job)
                    if len(jobs) == limit:
                        break
            if len(ids) < batch and len(jobs) < limit:
                return jobs, None
        more = self.redis.zrevrangebylex(index, f"({cursor}", "-", start=0, num=1)
        return jobs, (cursor if more else None)


_INTERNAL_FIELDS = frozenset({"process_pid", "tenant", "created_epoch", "gen", "enqueued_epoch", "attempt"})


def public_view(job: dict[str, Any]) -> dict[str, Any]:
    """The job resource clients see (API answers and webhooks): no internal fields, plus links."""
    base = f"/v1/jobs/{job['id']}"
    links = {"self": base}
    if job["state"] == SUCCEEDED:
        links.update(model=f"{base}/model", report=f"{base}/report")
    elif job["state"] == FAILED and str((job.get("error") or {}).get("type", "")).endswith("/target-not-met"):
        links["report"] = f"{base}/report"  # a search that missed its target still reports its trials
    return {**{k: v for k, v in job.items() if k not in _INTERNAL_FIELDS}, "links": links}


def _key(job_id: str) -> str:
    return f"{_PREFIX}job:{job_id}"


def _idempotency_key(tenant: str, key: str) -> str:
    return f"{_PREFIX}idempotency:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in fields.items()}


def _decode(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    record = {}
    for name, value in raw.items():
        record[_text(name)] = json.loads(value)
    record.setdefault("deliveries", 0)
    return record


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
