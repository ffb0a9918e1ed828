"""Job records in Redis and the only state moves a job may make.

A record is a Redis hash ``modelpress:job:<id>`` whose values are JSON. Every state change
goes through one Lua script, so a move and the indexes it touches are written atomically
(a cancel and a finish can race; exactly one wins). Indexes:

- ``modelpress:jobs`` and ``modelpress:tenant:<t>:jobs``: sorted sets, all scores 0, so
  members sort by id, and ULIDs sort by creation time (newest-first listing, id as cursor);
- ``modelpress:tenant:<t>:active``: the tenant's queued and running jobs (quota);
- ``modelpress:running``: running jobs scored by their supervisor's last heartbeat (reaper);
- ``modelpress:finished``: finished jobs scored by finish time (retention).

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
from typing import Any, Iterable

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
_PREFIX = "modelpress:"
_INDEX = _PREFIX + "jobs"
_RUNNING = _PREFIX + "running"
_FINISHED = _PREFIX + "finished"

# KEYS[1] job, KEYS[2] global index. ARGV[1] id, ARGV[2] tenant, ARGV[3] active-job limit,
# ARGV[4] method, ARGV[5] bytes uploaded, ARGV[6..] field, value pairs.
# Returns 1 when created, 0 when the tenant is at its limit.
_CREATE_SCRIPT = """
local active = 'modelpress:tenant:' .. ARGV[2] .. ':active'
if redis.call('SCARD', active) >= tonumber(ARGV[3]) then return 0 end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', 'modelpress:metrics', 'submitted|' .. ARGV[4], 1)
redis.call('HINCRBY', 'modelpress:metrics', 'bytes_uploaded', ARGV[5])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', 'modelpress:tenant:' .. ARGV[2] .. ':jobs', 0, ARGV[1])
redis.call('SADD', active, ARGV[1])
return 1
"""

# KEYS[1] job. ARGV[1] id, ARGV[2] new state, ARGV[3] comma-separated allowed current states,
# ARGV[4] now (epoch seconds), ARGV[5..] field, value pairs. Returns the state after the call.
_MOVE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return false end
current = cjson.decode(current)
for allowed in string.gmatch(ARGV[3], '[^,]+') do
  if allowed == current then
    local target = ARGV[2]
    redis.call('HSET', KEYS[1], 'state', cjson.encode(target))
    for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    if target == 'running' then
      redis.call('ZADD', 'modelpress:running', ARGV[4], ARGV[1])
    elseif target == 'succeeded' or target == 'failed' or target == 'cancelled' then
      local tenant = cjson.decode(redis.call('HGET', KEYS[1], 'tenant') or '"public"')
      redis.call('ZREM', 'modelpress:running', ARGV[1])
      redis.call('SREM', 'modelpress:tenant:' .. tenant .. ':active', ARGV[1])
      redis.call('ZADD', 'modelpress:finished', ARGV[4], ARGV[1])
      local spec = redis.call('HGET', KEYS[1], 'spec')
      local method = spec and cjson.decode(spec).method or 'unknown'
      local metrics = 'modelpress:metrics'
      redis.call('HINCRBY', metrics, 'finished|' .. target .. '|' .. method, 1)
      local created = tonumber(redis.call('HGET', KEYS[1], 'created_epoch') or ARGV[4])
      local duration = math.max(0, tonumber(ARGV[4]) - created)
      for _, bound in ipairs({1, 5, 15, 60, 300, 900, 1800, 3600, 14400}) do
        if duration <= bound then redis.call('HINCRBY', metrics, 'duration_bucket|' .. method .. '|' .. bound, 1) end
      end
      redis.call('HINCRBY', metrics, 'duration_count|' .. method, 1)
      redis.call('HINCRBYFLOAT', metrics, 'duration_sum|' .. method, duration)
    end
    return target
  end
end
return current
"""

# Sets fields only while the job is in one of the given states (progress must not overwrite a final state).
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

# KEYS[1] job. ARGV[1] id. Removes the record and every index entry.
_DELETE_SCRIPT = """
local tenant = cjson.decode(redis.call('HGET', KEYS[1], 'tenant') or '"public"')
redis.call('DEL', KEYS[1])
redis.call('ZREM', 'modelpress:jobs', ARGV[1])
redis.call('ZREM', 'modelpress:tenant:' .. tenant .. ':jobs', ARGV[1])
redis.call('SREM', 'modelpress:tenant:' .. tenant .. ':active', ARGV[1])
redis.call('ZREM', 'modelpress:running', ARGV[1])
redis.call('ZREM', 'modelpress:finished', ARGV[1])
return 1
"""


def new_job_id(now: float | None = None) -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32, sortable by creation time."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    milliseconds = int((time.time() if now is None else now) * 1000)
    value = (milliseconds << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(alphabet[(value >> shift) & 31] for shift in range(125, -1, -5))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore:
    """Reads and writes job records; knows nothing of HTTP or Celery."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_CREATE_SCRIPT)
        self._move = client.register_script(_MOVE_SCRIPT)
        self._update_if = client.register_script(_UPDATE_IF_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)

    def create(self, job: dict[str, Any], max_active: int = 1 << 30, uploaded_bytes: int = 0) -> bool:
        """Store a new record (state ``queued``) and index it; False if its tenant has ``max_active`` jobs."""
        job = {**job, "created_epoch": time.time()}
        args: list[Any] = [job["id"], job.get("tenant", "public"), max_active, job["spec"]["method"], int(uploaded_bytes)]
        for name, value in _encode(job).items():
            args += [name, value]
        created = bool(self._create(keys=[_key(job["id"]), _INDEX], args=args))
        if created:
            log.info("job %s: %s", job["id"], QUEUED, extra={"job_id": job["id"], "state": QUEUED, "event": "transition"})
        return created

    def metrics(self) -> dict[str, str]:
        """Counters kept by the scripts: submitted, finished, durations, bytes uploaded."""
        return {_text(k): _text(v) for k, v in self.redis.hgetall(_PREFIX + "metrics").items()}

    def running_count(self) -> int:
        return int(self.redis.zcard(_RUNNING))

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(_key(job_id))
        return _decode(raw) if raw else None

    def move(self, job_id: str, to_state: str, **fields: Any) -> str | None:
        """Move to ``to_state`` if allowed from the current state; return the state afterwards.

        The caller compares the answer with ``to_state`` to learn whether it won.
        """
        allowed = [state for state, targets in MOVES.items() if to_state in targets]
        args: list[Any] = [job_id, to_state, ",".join(allowed), time.time()]
        for name, value in _encode(fields).items():
            args += [name, value]
        result = _text(self._move(keys=[_key(job_id)], args=args) or b"") or None
        if result == to_state:
            log.info("job %s: %s", job_id, to_state, extra={"job_id": job_id, "state": to_state, "event": "transition"})
        return result

    def update_running(self, job_id: str, **fields: Any) -> bool:
        """Set fields (progress, stage) only while the job is running."""
        return self.update_if(job_id, [RUNNING], **fields)

    def update_if(self, job_id: str, states: Iterable[str], **fields: Any) -> bool:
        args: list[str] = [",".join(states)]
        for name, value in _encode(fields).items():
            args += [name, value]
        return bool(self._update_if(keys=[_key(job_id)], args=args))

    def cancel_wanted(self, job_id: str) -> bool:
        """True once a running job should stop: cancel requested, cancelled, or deleted (two fields, not the record)."""
        state, requested = self.redis.hmget(_key(job_id), ["state", "cancel_requested"])
        return state is None or json.loads(state) == CANCELLED or (requested is not None and json.loads(requested))

    def count_delivery(self, job_id: str) -> int:
        """Count one more delivery of the job to a worker; return the new count."""
        return int(self.redis.hincrby(_key(job_id), "deliveries_raw", 1))

    # ------------------------------------------------------------------ heartbeats and the reaper

    def beat(self, job_id: str) -> None:
        """The supervisor of a running job is alive (only updates jobs still indexed as running)."""
        self.redis.zadd(_RUNNING, {job_id: time.time()}, xx=True)

    def last_beat(self, job_id: str) -> float | None:
        return self.redis.zscore(_RUNNING, job_id)

    def stale_running(self, older_than_s: float) -> list[str]:
        """Running jobs whose supervisor has not beaten for ``older_than_s`` seconds."""
        return [_text(i) for i in self.redis.zrangebyscore(_RUNNING, "-inf", time.time() - older_than_s)]

    def reserve_requeue(self, job_id: str, hold_s: float) -> bool:
        """True for exactly one caller per ``hold_s``: stops every worker's reaper requeueing the same job."""
        return bool(self.redis.set(f"{_PREFIX}requeue:{job_id}", "1", nx=True, ex=max(1, int(hold_s))))

    def finished_before(self, epoch_s: float) -> list[str]:
        return [_text(i) for i in self.redis.zrangebyscore(_FINISHED, "-inf", epoch_s)]

    # ------------------------------------------------------------------ idempotency keys

    def remember_request(self, tenant: str, key: str, fingerprint: str, job_id: str, ttl_s: int) -> dict[str, str] | None:
        """Claim ``key`` for this request; if it was claimed before, return that claim instead."""
        name = f"{_PREFIX}idempotency:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"
        claim = json.dumps({"fingerprint": fingerprint, "job_id": job_id})
        if self.redis.set(name, claim, nx=True, ex=ttl_s):
            return None
        previous = self.redis.get(name)
        return json.loads(previous) if previous else None

    def forget_request(self, tenant: str, key: str) -> None:
        self.redis.delete(f"{_PREFIX}idempotency:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}")

    # ------------------------------------------------------------------ listing and deleting

    def delete(self, job_id: str) -> None:
        self._delete(keys=[_key(job_id)], args=[job_id])

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


_INTERNAL_FIELDS = frozenset({"process_pid", "deliveries", "tenant", "created_epoch"})


def public_view(job: dict[str, Any]) -> dict[str, Any]:
    """The job resource clients see (API answers and webhooks): no internal fields, plus links."""
    base = f"/v1/jobs/{job['id']}"
    links = {"self": base}
    if job["state"] == SUCCEEDED:
        links.update(model=f"{base}/model", report=f"{base}/report")
    return {**{k: v for k, v in job.items() if k not in _INTERNAL_FIELDS}, "links": links}


def _key(job_id: str) -> str:
    return f"{_PREFIX}job:{job_id}"


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in fields.items()}


def _decode(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    record = {}
    for name, value in raw.items():
        name = _text(name)
        if name == "deliveries_raw":
            record["deliveries"] = int(value)
        else:
            record[name] = json.loads(value)
    record.setdefault("deliveries", 0)
    return record


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
