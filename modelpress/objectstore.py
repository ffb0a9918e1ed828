"""Where a job's files are kept between the API and the workers: the local data directory (the
default, one host or a shared volume) or an S3-compatible object store (``MODELPRESS_STORAGE_URL=
s3://bucket/prefix``, workers on many hosts with nothing shared but Redis and the bucket). This
module holds what both promise (``ObjectStore``) and the data directory's (``LocalObjects``); the
bucket's is ``modelpress.s3_objects.S3Objects``, and ``modelpress.object_stores.open_object_store``
opens the one configured.

Both keep the names of ``modelpress.storage.JobFiles``, relative to the job's root: ``input/model.pt``,
``input/student.pt``, ``input/data``, ``spec.json``, ``model.attempt-<N>.pt``, ``report.attempt-<N>.json``,
``artifact.attempt-<N>.<target's file name>`` (export targets); in S3 under ``<prefix>jobs/<id>/``. The job's process always works in a local directory
(``workspace``): with S3 the supervisor stages the inputs there, and uploads the output after.

A reader never sees a partial result, in either store: the served names carry the attempt that
recorded success, that attempt writes them before its final state, and an S3 object (a multipart
upload too) becomes visible only once complete. The report goes last.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.artifacts import link_opened, measure, opened_plain
from modelpress.partstream import PartStream
from modelpress.storage import ARTIFACT_FILE_NAMES, JobFiles, Storage, read_json, write_json_atomic

STREAM_CHUNK = 1 << 20  # what a RemoteObject yields at a time

log = logging.getLogger("modelpress.objectstore")


class InputsMissing(Exception):
    """The job's inputs are not in the store (the job was deleted, or the bucket emptied)."""


class InputsCorrupt(Exception):
    """A staged input's bytes are not the ones uploaded (their SHA-256 differs from the record's)."""


class StoreUnavailable(Exception):
    """The object store did not answer, or refused (network, credentials, a missing bucket):
    the API answers 503; a supervisor leaves the job to be taken over once the store is back."""


@dataclass(frozen=True)
class RemoteObject:
    """A published object the API streams back (or redirects to) instead of a local file."""

    key: str
    size: int
    body: Any  # botocore's StreamingBody, or None for a HEAD-only answer (presigned redirect)

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self.body.iter_chunks(STREAM_CHUNK)
        finally:
            self.body.close()


class ObjectStore(ABC):
    """What the API, the supervisor and the reaper do with a job's files."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage  # the local data directory: uploads spool here, jobs run here

    streams_to_store = False  # whether ``stream_writer`` sends uploads anywhere beyond the local spool

    def stream_writer(self, job_id: str, path: Path) -> PartStream | None:
        """API, when a file part of a submission starts: where to send its bytes as they arrive, on top
        of the local spool (``path`` is the file's local name in the job's directory). None: the spool
        is all (the local store keeps it where it is)."""
        return None

    def drop_streams(self, job_id: str) -> None:  # noqa: B027  optional hook: nothing to drop by default
        """API, when the request ends (and before ``delete``): abort what ``stream_writer`` started
        for the job and ``keep_inputs`` did not complete."""

    def unavailable(self) -> str | None:
        """/readyz: why the store cannot take jobs' files now, or None."""
        return None  # the data directory: the API could not have started without it

    def stale_host_files(self, before_epoch_s: float) -> list[Path]:
        """Orphan sweep: this host's files of requests that began before ``before_epoch_s`` and died
        without settling them (an API process killed mid-upload): spool files last written then."""
        return self.storage.spools_before(before_epoch_s)

    def workspaces(self) -> list[tuple[str, int]]:
        """Orphan sweep: (job id, attempt) of the attempt workspaces on this host."""
        return []

    @abstractmethod
    def keep_inputs(self, job_id: str) -> None:
        """API, after the checks and before the record: make the inputs and spec reachable by any worker."""

    @abstractmethod
    def workspace(self, job_id: str, attempt: int, digests: dict[str, str] | None = None) -> JobFiles:
        """Supervisor: the local directory where this attempt's process runs, inputs in place.
        Raises ``InputsMissing`` when the inputs are gone. ``digests`` (``JobFiles`` attribute, such
        as ``input_model``, to the SHA-256 the API computed as the upload arrived): inputs that
        travelled through a store are checked against them (``InputsCorrupt``)."""

    @abstractmethod
    def publish(self, job_id: str, attempt: int, files: JobFiles, report: dict[str, Any]) -> Path:
        """Supervisor: publish this attempt's output model and report under its attempt's names.
        Returns a local file with the very bytes published (to hash for the job's result)."""

    @abstractmethod
    def publish_artifact(self, job_id: str, attempt: int, files: JobFiles, file_name: str) -> tuple[int, str]:
        """Supervisor, before ``publish``: publish the export-target artifact ``output/<file_name>`` under its
        attempt's name; the bytes and SHA-256 of what was published (``NotPlainFile``: a link, a FIFO, gone)."""

    @abstractmethod
    def publish_report(self, job_id: str, attempt: int, report: dict[str, Any]) -> None:
        """Supervisor: publish only a report, for a failed attempt that wrote one (a search's trials)."""

    @abstractmethod
    def withdraw(self, job_id: str, attempt: int) -> None:
        """Supervisor: remove what ``publish`` wrote when the attempt then lost the final state."""

    @abstractmethod
    def release(self, job_id: str, attempt: int) -> None:
        """Supervisor: the attempt is over; drop what exists only for it on this host."""

    @abstractmethod
    def model(self, job_id: str, attempt: int | None) -> Path | RemoteObject:
        """API: the published model, a local path or an object to stream."""

    @abstractmethod
    def artifact(self, job_id: str, attempt: int | None, file_name: str) -> Path | RemoteObject:
        """API: a published export-target artifact, a local path or an object to stream."""

    @abstractmethod
    def read_report(self, job_id: str, attempt: int | None) -> dict[str, Any]:
        """API: the published report (``FileNotFoundError`` when it is gone)."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """API (DELETE, a rolled-back submission) and reaper (retention): every file of the job."""


class LocalObjects(ObjectStore):
    """The data directory itself: what ModelPress always did, unchanged (one host or a shared volume)."""

    def keep_inputs(self, job_id: str) -> None:
        pass  # the upload is already in the job's directory, which every worker sees

    def workspace(self, job_id: str, attempt: int, digests: dict[str, str] | None = None) -> JobFiles:
        return self.storage.job(job_id)  # the uploaded files themselves: nothing travelled

    def publish(self, job_id: str, attempt: int, files: JobFiles, report: dict[str, Any]) -> Path:
        # The child writes ``output/model.pt`` by rename, so a hard link names one complete file that
        # nobody writes again, even if a superseded child (alive during a partition) renames another
        # file over the shared name: hashing the link hashes what is served.
        model = files.published_model(attempt)
        model.unlink(missing_ok=True)
        model.hardlink_to(files.output_model)
        write_json_atomic(files.published_report(attempt), report)
        return model

    def publish_artifact(self, job_id: str, attempt: int, files: JobFiles, file_name: str) -> tuple[int, str]:
        source = files.output_artifact(file_name)
        with opened_plain(source) as handle:  # a hard link, like the model: measured is served
            link_opened(handle, source, files.published_artifact(attempt, file_name))
            return measure(handle)

    def publish_report(self, job_id: str, attempt: int, report: dict[str, Any]) -> None:
        write_json_atomic(self.storage.job(job_id).published_report(attempt), report)

    def withdraw(self, job_id: str, attempt: int) -> None:
        files = self.storage.job(job_id)
        files.published_model(attempt).unlink(missing_ok=True)
        files.published_report(attempt).unlink(missing_ok=True)
        for name in ARTIFACT_FILE_NAMES:
            files.published_artifact(attempt, name).unlink(missing_ok=True)

    def release(self, job_id: str, attempt: int) -> None:
        pass  # the job's directory is where the API serves from

    def model(self, job_id: str, attempt: int | None) -> Path:
        return self.storage.job(job_id).published_model(attempt)

    def artifact(self, job_id: str, attempt: int | None, file_name: str) -> Path:
        return self.storage.job(job_id).published_artifact(attempt, file_name)

    def read_report(self, job_id: str, attempt: int | None) -> dict[str, Any]:
        return read_json(self.storage.job(job_id).published_report(attempt))

    def delete(self, job_id: str) -> None:
        self.storage.delete(job_id)
