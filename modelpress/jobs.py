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
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import redis

from modelpress import job_scripts as scripts

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


def new_job_id(now: float | None = None) -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32, sortable by creation time."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    milliseconds = int((time.time() if now is None else now) * 1000)
    value = (milliseconds << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(alphabet[(value >> shift) & 31] for shift in range(125, -1, -5))


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        self._create = client.register_script(scripts.CREATE_SCRIPT)
        self._claim = client.register_script(scripts.CLAIM_SCRIPT)
        self._beat = client.register_script(scripts.BEAT_SCRIPT)
        self._finish = client.register_script(scripts.FINISH_SCRIPT)
        self._update_if = client.register_script(scripts.UPDATE_IF_SCRIPT)
        self._resend = client.register_script(scripts.RESEND_SCRIPT)
        self._delete = client.register_script(scripts.DELETE_SCRIPT)
        self._lease_event = client.register_script(scripts.LEASE_EVENT_SCRIPT)
        self._retry_event = client.register_script(scripts.RETRY_EVENT_SCRIPT)

    def create(
        self,
        job: dict[str, Any],
        max_active: int = 1 << 30,
        uploaded_bytes: int = 0,
        idempotency: tuple[str, str, str, int] | None = None,
    ) -> tuple[str, dict[str, str] | None]:
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
        args: list[Any] = [
            job["id"],
            job.get("tenant", "public"),
            max_active,
            job["spec"]["method"],
            int(uploaded_bytes),
            key_name,
            claim,
            ttl,
        ]
        for name, value in _encode(job).items():
            args += [name, value]
        answer = [_text(part) for part in self._create(keys=[_key(job["id"]), _INDEX], args=args)]
        if answer[0] == "created":
            log.info(
                "job %s: %s", job["id"], QUEUED, extra={"job_id": job["id"], "state": QUEUED, "event": "transition"}
            )
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
        answer = self._claim(
            keys=[_key(job_id)],
            args=[
                job_id,
                "" if generation is None else int(generation),
                stale_s,
                self.redis_started(),
                json.dumps(utc_now()),
                int(max_running),
            ],
        )
        outcome = _text(answer[0])
        if outcome != "claimed":
            return Claim(outcome, _text(answer[1]))
        log.info(
            "job %s: %s (attempt %s)",
            job_id,
            RUNNING,
            int(answer[1]),
            extra={"job_id": job_id, "state": RUNNING, "event": "transition"},
        )
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
        return int(self._resend(keys=[_key(job_id)], args=[job_id, generation, bound_s, stale_s, self.redis_started()]))

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

    def page(
        self, tenant: str, state: str | None = None, limit: int = 20, after: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
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
        if (job.get("spec") or {}).get("targets"):
            links["artifacts"] = f"{base}/artifacts"
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
