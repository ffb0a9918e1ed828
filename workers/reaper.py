"""Housekeeping that runs in every worker's main process: requeue orphaned jobs, remove expired ones.

- A ``running`` job whose supervisor stopped beating (its worker was killed, its machine died)
  is sent to the queue again; the next supervisor takes it over and counts a delivery, so a job
  that keeps killing workers still ends ``failed``.
- Finished jobs older than ``MODELPRESS_RETENTION_HOURS`` lose their record and files.
Several workers may run this at once: a Redis key lets one requeue per job and stale period.
"""
from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Celery

from modelpress.config import Settings
from modelpress.jobs import JobStore
from modelpress.storage import Storage
from workers.celery_app import RUN_JOB_TASK

log = logging.getLogger("modelpress.reaper")


class Reaper:
    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self.store = JobStore(redis.Redis.from_url(settings.redis_url, health_check_interval=30))
        self.storage = Storage(settings.data_dir)
        self.interval_s = max(1.0, settings.heartbeat_stale_s / 3)
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="modelpress-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> tuple[list[str], list[str]]:
        """One pass; returns (requeued job ids, expired job ids)."""
        requeued = []
        for job_id in self.store.stale_running(self.settings.heartbeat_stale_s):
            if self.store.reserve_requeue(job_id, self.settings.heartbeat_stale_s):
                self.celery.send_task(RUN_JOB_TASK, args=[job_id])
                requeued.append(job_id)
                log.warning("job %s: its worker stopped beating; requeued", job_id)
        expired = self.store.finished_before(time.time() - self.settings.retention_hours * 3600)
        for job_id in expired:
            self.storage.delete(job_id)
            self.store.delete(job_id)
            log.info("job %s: removed after %d hours of retention", job_id, self.settings.retention_hours)
        return requeued, expired

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                log.warning("reaper: Redis unreachable (%s); trying again", error)
            except Exception:
                log.exception("reaper: sweep failed; trying again")
