"""Celery tasks. Thin: each hands its work to a plain function."""
from __future__ import annotations

from celery import shared_task

from workers.celery_app import RUN_JOB_TASK
from workers.supervisor import Supervisor


@shared_task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(task, job_id: str) -> str:
    """Run one job to a final state; return that state."""
    return Supervisor.from_settings(task.app.conf.modelpress_settings).run(job_id)
