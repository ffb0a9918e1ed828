"""Housekeeping that runs in every worker's main process: re-send jobs whose message is gone,
remove expired ones.

- The reconciler: a job that needs a message (``queued``, or ``running`` with a supervisor that
  stopped beating) but has none waiting in the queue, and was last sent more than
  ``MODELPRESS_HEARTBEAT_STALE_S`` ago, is sent again. Causes: the API died between record and
  enqueue, Redis lost the last second of its append-only file, the supervisor raised before
  taking the job, a worker was killed. The re-send is a compare-and-set on the job's enqueue
  generation, so of several workers exactly one re-sends per loss, and an older message that
  turns up later is dropped by the claim. The next supervisor counts a delivery, so a job that
  keeps killing workers still ends ``failed``.
- Retention: finished jobs older than ``MODELPRESS_RETENTION_HOURS`` lose their record, then
  their files, local or in the object store (a download in between answers 404, never 500). Files
  the object store did not remove (it was away, for this or for a ``DELETE``) are retried at each
  sweep (``modelpress.cleanup.remove_files_left``).
- Orphans: the files of uploads whose API process was killed mid-request (noted in Redis as they
  began, never recorded nor rolled back) once older than ``MODELPRESS_ORPHAN_AFTER_S``, and this
  host's workspaces of jobs that ended elsewhere (``modelpress.cleanup.remove_orphans``), and this
  host's pre-started sandboxes' folders whose worker process was killed (``workers.warm_folders.sweep``:
  a taken one holds hard links of its job's inputs).
"""

from __future__ import annotations

import logging
import re
import threading
import time

import redis
from celery import Celery

from modelpress.cleanup import remove_files_left, remove_job, remove_orphans
from modelpress.config import Settings
from modelpress.jobs import JobStore, connect
from modelpress.object_stores import open_object_store
from workers import warm_folders
from workers.celery_app import QUEUE, send_job

log = logging.getLogger("modelpress.reaper")
_JOB_ID = re.compile(rb"[0-9A-HJKMNP-TV-Z]{26}")


class Reaper:
    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self.store = JobStore(connect(settings.redis_url))
        self.objects = open_object_store(settings)  # the data directory, or the bucket
        self.interval_s = max(1.0, settings.heartbeat_stale_s / 3)
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="modelpress-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> tuple[list[str], list[str]]:
        """One pass; returns (re-sent job ids, expired job ids)."""
        resent = self.reconcile()
        remove_files_left(self.store, self.objects)  # of jobs deleted while the object store was away
        remove_orphans(self.store, self.objects, self.settings.orphan_after_s)  # of requests and workers killed
        try:
            for folder in warm_folders.sweep(self.settings.data_dir):  # of pool processes killed
                log.info("removed the pre-started sandbox folder %s: its worker process is gone", folder.name)
        except OSError as error:  # (a filesystem without flock): retention below must still run
            log.warning("reaper: pre-started sandbox folders not swept (%s)", error)
        expired = self.store.finished_before(time.time() - self.settings.retention_hours * 3600)
        for job_id in expired:
            if not remove_job(self.store, self.objects, job_id):
                break  # the store is away: the other jobs keep their records and expire at a later sweep
            log.info("job %s: removed after %s hours of retention", job_id, self.settings.retention_hours)
        return resent, expired

    def reconcile(self) -> list[str]:
        stale_s = self.settings.heartbeat_stale_s
        waiting = self._ids_waiting_in_queue()
        resent = []
        for job_id, generation in self.store.unsettled(stale_s):
            if job_id in waiting:
                continue  # its message is live; a backlog is not a loss
            new_generation = self.store.resend(job_id, generation, bound_s=stale_s, stale_s=stale_s)
            if new_generation:
                send_job(self.celery, job_id, new_generation)
                resent.append(job_id)
                log.warning(
                    "job %s: no live message (worker or message lost); re-sent as generation %d",
                    job_id,
                    new_generation,
                    extra={"job_id": job_id},
                )
        return resent

    def _ids_waiting_in_queue(self) -> set[str]:
        """Job ids named by messages still waiting in the broker's queue (Celery's headers carry the
        arguments in clear, ``argsrepr``)."""
        found: set[str] = set()
        for raw in self.store.redis.lrange(QUEUE, 0, -1):
            found.update(match.decode() for match in _JOB_ID.findall(raw))
        return found

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                log.warning("reaper: Redis unreachable (%s); trying again", error)
            except Exception:
                log.exception("reaper: sweep failed; trying again")
