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

import json
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

_PREFIX = "modelpress:"
_INDEX = _PREFIX + "jobs"
_RUNNING = _PREFIX + "running"
_FINISHED = _PREFIX + "finished"

# KEYS[1] job, KEYS[2] global index. ARGV[1] id, ARGV[2] tenant, ARGV[3] active-job limit,
# ARGV[4..] field, value pairs. Returns 1 when created, 0 when the tenant is at its limit.
_CREATE_SCRIPT = """
local active = 'modelpress:tenant:' .. ARGV[2] .. ':active'
if redis.call('SCARD', active) >= tonumber(ARGV[3]) then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
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

    def create(self, job: dict[str, Any], max_active: int = 1 << 30) -> bool:
        """Store a new record (state ``queued``) and index it; False if its tenant has ``max_active`` jobs."""
        args: list[Any] = [job["id"], job.get("tenant", "public"), max_active]
        for name, value in _encode(job).items():
            args += [name, value]
        return bool(self._create(keys=[_key(job["id"]), _INDEX], args=args))

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
        result = self._move(keys=[_key(job_id)], args=args)
        return _text(result) if result else None

    def update_running(self, job_id: str, **fields: Any) -> bool:
        """Set fields (progress, stage) only while the job is running."""
        return self.update_if(job_id, [RUNNING], **fields)

    def update_if(self, job_id: str, states: Iterable[str], **fields: Any) -> bool:
        args: list[str] = [",".join(states)]
        for name, value in _encode(fields).items():
            args += [name, value]
        return bool(self._update_if(keys=[_key(job_id)], args=args))

    def count_delivery(self, job_id: str) -> int:
        """Count one more delivery of the job to a worker; return the new count."""
        return int(self.redis.hincrby(_key(job_id), "deliveries_raw", 1))

    def active_count(self, tenant: str) -> int:
        return int(self.redis.scard(f"{_PREFIX}tenant:{tenant}:active"))

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
