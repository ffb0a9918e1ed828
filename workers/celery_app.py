"""The Celery application, built from ``Settings``; both the API (to send) and the worker use it."""

from __future__ import annotations

from celery import Celery

from modelpress.config import Settings
from modelpress.jobs import REDIS_TIMEOUTS

RUN_JOB_TASK = "modelpress.run_job"
QUEUE = "modelpress"


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
