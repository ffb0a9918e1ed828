"""Removing jobs' files: on DELETE and retention, and the reaper's sweeps of what no job needs.

Each function works through the job store (Redis) and an object store (``modelpress.objectstore``),
whichever kind the settings name.
"""

from __future__ import annotations

import logging
import shutil
import time

from modelpress.jobs import FINAL_STATES, JobStore
from modelpress.objectstore import ObjectStore, StoreUnavailable

log = logging.getLogger("modelpress.objectstore")


def remove_job(store: JobStore, objects: ObjectStore, job_id: str) -> bool:
    """DELETE and retention: the record first (from then on the API answers 404, never a 500 on a
    half-removed job), then the files. A store that does not answer leaves the job's id for the
    reaper to retry (``remove_files_left``); returns whether the files went."""
    store.delete(job_id)
    return _remove_files(store, objects, job_id)


def remove_files_left(store: JobStore, objects: ObjectStore) -> list[str]:
    """Reaper: retry the files of deleted jobs that the store did not remove; the ids removed now."""
    removed = []
    for job_id in store.jobs_with_files_left():
        if not _remove_files(store, objects, job_id):
            break  # still down: the next sweep tries again
        removed.append(job_id)
    return removed


def remove_orphans(store: JobStore, objects: ObjectStore, older_than_s: float) -> list[str]:
    """Reaper (and, for this host's files only, the API's start): what no job needs any more and
    nothing else would remove.

    - Uploads never settled (neither recorded as a job nor rolled back) and idle for more than
      ``older_than_s``: an API process was killed mid-request. The API notes each upload as it
      begins and, streaming to a store, as its bytes arrive (``JobStore.upload_active``); the
      files of such a job (its folder, and with an object store its unfinished multipart uploads
      and objects) are removed unless a record names it. Nothing the API did not note is
      touched, so a Redis that lost its data (or another deployment's) never empties a bucket.
    - This host's spool files and request folders not written for that long (``ObjectStore.stale_host_files``).
    - Attempt workspaces on this host of jobs that ended or are gone (a worker killed mid-job,
      whose job another host then finished).

    Returns the ids of the unsettled uploads whose files were removed.
    """
    cutoff = time.time() - older_than_s
    removed = []
    unsettled = store.uploads_idle_since(cutoff)
    for job_id, state in store.states(unsettled).items():
        if state is None:
            try:
                objects.delete(job_id)
            except StoreUnavailable as error:
                log.warning("upload of job %s: files not removed (%s); the next sweep retries", job_id, error)
                break
            removed.append(job_id)
            log.warning(
                "upload of job %s: removed its files, which no record names (its request was killed mid-upload)",
                job_id,
                extra={"job_id": job_id},
            )
        store.upload_settled(job_id)
    remove_host_leftovers(objects, older_than_s)
    workspaces = objects.workspaces()
    states = store.states({job_id for job_id, _ in workspaces})
    for job_id, attempt in workspaces:
        if states[job_id] is None or states[job_id] in FINAL_STATES:
            objects.release(job_id, attempt)
    return removed


def remove_host_leftovers(objects: ObjectStore, older_than_s: float) -> None:
    """This host's files of requests killed more than ``older_than_s`` ago (see ``remove_orphans``)."""
    for path in objects.stale_host_files(time.time() - older_than_s):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _remove_files(store: JobStore, objects: ObjectStore, job_id: str) -> bool:
    try:
        objects.delete(job_id)
    except StoreUnavailable as error:
        store.files_left(job_id)
        log.warning("job %s: files not removed (%s); the reaper retries", job_id, error, extra={"job_id": job_id})
        return False
    store.files_left(job_id, removed=True)
    return True
