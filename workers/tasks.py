"""Celery tasks. Thin: each hands its work to a plain function."""
from __future__ import annotations

from celery import shared_task

from workers.celery_app import RUN_JOB_TASK
from workers.supervisor import Supervisor


@shared_task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(task, job_id: str, generation: int | None = None) -> str:
    """Run one job to a final state; return that state. Its webhook leaves through the outbox."""
    supervisor = Supervisor.from_settings(task.app.conf.modelpress_settings)
    state, _ = supervisor.run(job_id, generation)
    return state
