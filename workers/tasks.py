"""Celery tasks. Thin: each hands its work to a plain function."""

from __future__ import annotations

from celery import shared_task

from workers.celery_app import RUN_JOB_TASK
from workers.supervisor import Supervisor, TenantBusy

# A job whose tenant runs its cap of jobs is sent again after this long; meanwhile the slot serves
# another tenant's job. Shorter than the reconciler's staleness bound (MODELPRESS_HEARTBEAT_STALE_S).
PUT_BACK_S = 2.0


@shared_task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(task, job_id: str, generation: int | None = None) -> str:
    """Run one job to a final state; return that state. Its webhook leaves through the outbox."""
    supervisor = Supervisor.from_settings(task.app.conf.modelpress_settings)
    try:
        state, _ = supervisor.run(job_id, generation)
    except TenantBusy:
        # Put back: a new message of the same generation first, then this one is acknowledged (by
        # returning). A crash in between leaves two messages, of which the claim lets one run.
        task.apply_async(args=[job_id, generation], countdown=PUT_BACK_S)
        return "queued"
    return state
