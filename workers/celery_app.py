"""The Celery application, built from ``Settings``; both the API (to send) and the worker use it."""
from __future__ import annotations

from celery import Celery

from modelpress.config import Settings

RUN_JOB_TASK = "modelpress.run_job"
DELIVER_WEBHOOK_TASK = "modelpress.deliver_webhook"
QUEUE = "modelpress"
EVENTS_QUEUE = "modelpress-events"  # webhooks: small, and never stuck behind a queue of jobs


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
        task_routes={RUN_JOB_TASK: {"queue": QUEUE}, DELIVER_WEBHOOK_TASK: {"queue": EVENTS_QUEUE}},
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # The supervisor enforces the job's own limit; these only stop a supervisor that hangs itself.
        task_soft_time_limit=settings.job_timeout_s + 120,
        task_time_limit=settings.job_timeout_s + 300,
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=100,
        task_serializer="json",
        accept_content=["json"],
    )
    app.conf.modelpress_settings = settings
    return app


def announce_final(celery: Celery, job: dict) -> None:
    """Queue the webhook of a job that just reached a final state, if it named a callback."""
    if job.get("callback_url"):
        celery.send_task(DELIVER_WEBHOOK_TASK, args=[job["id"]])
