"""Job records in Redis and the only state moves a job may make.

A record is a Redis hash ``modelpress:job:<id>`` whose values are JSON. Every state
change goes through one Lua script, so a move is checked and written atomically (a
cancel and a finish can race; exactly one wins).
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
_INDEX = _PREFIX + "jobs"  # sorted set, all scores 0: members sort by id, and ids sort by creation time

# KEYS[1] job key; ARGV[1] new state; ARGV[2] comma-separated allowed current states;
# ARGV[3..] field, value pairs to set with the move. Returns the state after the call.
_MOVE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return false end
current = cjson.decode(current)
for allowed in string.gmatch(ARGV[2], '[^,]+') do
  if allowed == current then
    redis.call('HSET', KEYS[1], 'state', cjson.encode(ARGV[1]))
    for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return ARGV[1]
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
        self._move = client.register_script(_MOVE_SCRIPT)
        self._update_if = client.register_script(_UPDATE_IF_SCRIPT)

    def create(self, job: dict[str, Any]) -> None:
        """Store a new record (state ``queued``) and index it."""
        key = _key(job["id"])
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=_encode(job))
            pipe.zadd(_INDEX, {job["id"]: 0})
            pipe.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(_key(job_id))
        return _decode(raw) if raw else None

    def move(self, job_id: str, to_state: str, **fields: Any) -> str | None:
        """Move to ``to_state`` if allowed from the current state; return the state afterwards.

        The caller compares the answer with ``to_state`` to learn whether it won.
        """
        allowed = [state for state, targets in MOVES.items() if to_state in targets]
        return self._run_move(job_id, to_state, allowed, fields)

    def redeliver(self, job_id: str) -> str | None:
        """Record another delivery of a job that was already ``running`` (its worker died)."""
        return self._run_move(job_id, RUNNING, [RUNNING], {})

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

    def delete(self, job_id: str) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(_key(job_id))
            pipe.zrem(_INDEX, job_id)
            pipe.execute()

    def page(self, state: str | None = None, limit: int = 20, after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Jobs newest first, at most ``limit``, starting after the id ``after``; and the next cursor."""
        jobs: list[dict[str, Any]] = []
        cursor = after
        batch = max(limit * 2, 50)
        while len(jobs) < limit:
            upper = f"({cursor}" if cursor else "+"
            ids = self.redis.zrevrangebylex(_INDEX, upper, "-", start=0, num=batch)
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
        more = self.redis.zrevrangebylex(_INDEX, f"({cursor}", "-", start=0, num=1)
        return jobs, (cursor if more else None)

    def ids_in_state(self, state: str) -> list[str]:
        """Every job id currently in ``state`` (a scan; used by maintenance, not by requests)."""
        found = []
        for job_id in self.redis.zrange(_INDEX, 0, -1):
            job_id = _text(job_id)
            value = self.redis.hget(_key(job_id), "state")
            if value is not None and json.loads(value) == state:
                found.append(job_id)
        return found

    def _run_move(self, job_id: str, to_state: str, allowed: list[str], fields: dict[str, Any]) -> str | None:
        args: list[str] = [to_state, ",".join(allowed)]
        for name, value in _encode(fields).items():
            args += [name, value]
        result = self._move(keys=[_key(job_id)], args=args)
        return _text(result) if result else None


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
