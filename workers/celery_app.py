"""The Celery application, built from ``Settings``; both the API (to send) and the worker use it."""

from __future__ import annotations

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from modelpress.config import Settings
from modelpress.jobs import REDIS_TIMEOUTS

RUN_JOB_TASK = "modelpress.run_job"
QUEUE = "modelpress"


def _lost_client_is_a_connection_error() -> None:
    """kombu 5.7's Redis channel, closed after the broker went away with messages unacknowledged, asks
    for a new connection pool to restore them while its connection's ``client`` is already ``None``:
    ``AttributeError`` in ``_connparams``, which Celery's consumer does not expect there, so the worker's
    main process stopped ("Unrecoverable error") on a Redis restart, and with it every job it ran
    (seen in the suite: both workers of a stack, at the same restart). A connection without its
    client is a lost connection: raise the error the transport lists as one, which the consumer
    ignores while closing and recovers from. The messages stay unacknowledged in Redis, restored
    after the visibility timeout, and the reaper re-sends any job without a live message sooner."""
    original = kombu_redis.Channel._connparams
    if getattr(original, "modelpress_patched", False):
        return

    def _connparams(self, asynchronous: bool = False):
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed (no client)")
        return original(self, asynchronous=asynchronous)

    _connparams.modelpress_patched = True
    kombu_redis.Channel._connparams = _connparams


_lost_client_is_a_connection_error()


def make_celery(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set; `make run` starts an embedded Redis and sets it")
    app = Celery("modelpress", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        # A job is acknowledged only when it ends, so a worker that dies mid-job leaves it to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_routes={RUN_JOB_TASK: {"queue": QUEUE}},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis however long it is away
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s, **REDIS_TIMEOUTS},
        # No Celery time limits: the supervisor enforces the job's own limit, and a supervisor
        # waiting for Redis to come back to record a final state must not be killed (the job
        # would run again). Socket timeouts keep it from hanging on a dead connection.
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=100,
        task_serializer="json",
        accept_content=["json"],
    )
    app.conf.modelpress_settings = settings
    return app


def send_job(celery: Celery, job_id: str, generation: int) -> None:
    """Send the job's message; ``generation`` lets a delivery tell a current message from a superseded one."""
    celery.send_task(RUN_JOB_TASK, args=[job_id, generation])
