"""Celery tasks. Thin: each hands its work to a plain function."""
from __future__ import annotations

import random

from celery import shared_task

from modelpress import jobs
from workers.celery_app import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, announce_final
from workers.supervisor import Supervisor
from workers.webhook_delivery import DeliveryFailed, deliver

MAX_WEBHOOK_ATTEMPTS = 8


@shared_task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(task, job_id: str) -> str:
    """Run one job to a final state; return that state."""
    supervisor = Supervisor.from_settings(task.app.conf.modelpress_settings)
    state, changed = supervisor.run(job_id)
    if changed and state in jobs.FINAL_STATES:
        announce_final(task.app, supervisor.store.get(job_id) or {})
    return state


@shared_task(name=DELIVER_WEBHOOK_TASK, bind=True, acks_late=True, max_retries=MAX_WEBHOOK_ATTEMPTS - 1)
def deliver_webhook(task, job_id: str) -> int | None:
    """POST the job resource to its callback; retry with exponential backoff and jitter on failure."""
    settings = task.app.conf.modelpress_settings
    try:
        return deliver(settings, Supervisor.from_settings(settings).store, job_id, attempt=task.request.retries + 1)
    except DeliveryFailed as failure:
        delay = settings.webhook_backoff_s * (2 ** task.request.retries) * random.uniform(1.0, 1.5)
        raise task.retry(exc=failure, countdown=delay)
