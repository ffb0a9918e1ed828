"""Where a job's files are kept between the API and the workers: the local data directory (the
default, one host or a shared volume) or an S3-compatible object store (``MODELPRESS_STORAGE_URL=
s3://bucket/prefix``, workers on many hosts with nothing shared but Redis and the bucket).

Both keep the names of ``modelpress.storage.JobFiles``, relative to the job's root: ``input/model.pt``,
``input/student.pt``, ``input/data``, ``spec.json``, ``model.attempt-<N>.pt``, ``report.attempt-<N>.json``,
``artifact.attempt-<N>.<target's file name>`` (export targets); in S3 under ``<prefix>jobs/<id>/``. The job's process always works in a local directory
(``workspace``): with S3 the supervisor stages the inputs there, and uploads the output after.

A reader never sees a partial result, in either store: the served names carry the attempt that
recorded success, that attempt writes them before its final state, and an S3 object (a multipart
upload too) becomes visible only once complete. The report goes last.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from modelpress.artifacts import file_sha256, link_opened, measure, opened_plain
from modelpress.config import Settings
from modelpress.fault_injection import fault_point
from modelpress.partstream import MAX_PARTS, PartStream
from modelpress.s3clients import s3_clients
from modelpress.storage import ARTIFACT_FILE_NAMES, JobFiles, Storage, read_json, write_json_atomic

# Multipart from 16 MB in 16 MB parts, 8 at a time: at most ~128 MB of one transfer is in memory.
PART_BYTES = 16 << 20
TRANSFER_THREADS = 8
STREAM_CHUNK = 1 << 20
# Uploads of one API process that stream while they arrive. An API process serves each connection
# on a greenlet (modelpress/apiserver.py), so nothing else bounds how many uploads buffer parts at
# once: past this, an upload only spools and is sent from the spool when the request completes,
# which keeps an API process's part buffers under STREAMING_UPLOADS x 80 MB.
STREAMING_UPLOADS = 8

log = logging.getLogger("modelpress.objectstore")


class InputsMissing(Exception):
    """The job's inputs are not in the store (the job was deleted, or the bucket emptied)."""


class InputsCorrupt(Exception):
    """A staged input's bytes are not the ones uploaded (their SHA-256 differs from the record's)."""


class StoreUnavailable(Exception):
    """The object store did not answer, or refused (network, credentials, a missing bucket):
    the API answers 503; a supervisor leaves the job to be taken over once the store is back."""


def _translated(method):
    """Turn botocore's errors (other than a missing key, which each method maps) into ``StoreUnavailable``."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(self, *args, **kwargs)
        except (BotoCoreError, ClientError) as error:
            raise StoreUnavailable(f"object store s3://{self.bucket}: {error}") from error

    return call


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


class S3Objects(ObjectStore):
    """An S3-compatible bucket through boto3; see docs/architecture.md, "Object storage"."""

    streams_to_store = True

    def __init__(self, storage: Storage, settings: Settings) -> None:
        super().__init__(storage)
        from boto3.s3.transfer import TransferConfig

        location = urlparse(settings.storage_url or "")
        if location.scheme != "s3" or not location.netloc:
            raise ValueError(f"MODELPRESS_STORAGE_URL must look like s3://bucket/prefix, got {settings.storage_url!r}")
        self.bucket = location.netloc
        prefix = location.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.presign_s = settings.s3_presign_s
        self.client, self._probe = s3_clients(settings)
        self.transfer = TransferConfig(
            multipart_threshold=PART_BYTES,
            multipart_chunksize=PART_BYTES,
            max_concurrency=TRANSFER_THREADS,
            use_threads=True,
        )
        self.stream_part_bytes = settings.s3_part_mb << 20
        if settings.max_upload_mb > settings.s3_part_mb * MAX_PARTS:
            raise ValueError(
                f"MODELPRESS_MAX_UPLOAD_MB={settings.max_upload_mb} needs more than S3's {MAX_PARTS} parts "
                f"of MODELPRESS_S3_PART_MB={settings.s3_part_mb}: raise the part size"
            )
        self._streams: dict[str, dict[str, PartStream]] = {}  # job id -> key -> this process's streamed uploads
        self._streams_lock = threading.Lock()
        self._streaming = threading.BoundedSemaphore(STREAMING_UPLOADS)
        self._pool: ThreadPoolExecutor | None = None  # made on first use: gunicorn forks after create_app

    def unavailable(self) -> str | None:
        # One quick try, not the transfers' five with back-off: a readiness probe must answer fast.
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except Exception as error:
            return f"object store s3://{self.bucket} does not answer: {error}"
        return None

    def stale_host_files(self, before_epoch_s: float) -> list[Path]:
        # The API host keeps a job's folder only while its request runs (``keep_inputs`` removes it),
        # and writes into it all the while (inputs linked, then the spec).
        return super().stale_host_files(before_epoch_s) + self.storage.job_folders_before(before_epoch_s)

    def workspaces(self) -> list[tuple[str, int]]:
        found = []
        for folder in (self.storage.data_dir / "work").glob("*/*"):
            if folder.parent.name.isdigit() and folder.is_dir():
                found.append((folder.name, int(folder.parent.name)))
        return found

    def key(self, job_id: str, path: Path) -> str:
        """The object key of one of the job's files, from its local path (one naming for both stores)."""
        files = self.storage.job(job_id)
        return f"{self.prefix}jobs/{job_id}/{path.relative_to(files.root).as_posix()}"

    @staticmethod
    def _inputs(files: JobFiles) -> tuple[tuple[str, Path], ...]:
        """The job's input files, each with its ``JobFiles`` name."""
        return tuple((name, getattr(files, name)) for name in ("input_model", "input_student", "input_data", "spec"))

    # ------------------------------------------------------------------ API: submit

    def stream_writer(self, job_id: str, path: Path) -> PartStream:
        with self._streams_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="s3-parts")
            writer = PartStream(
                self.client, self.bucket, self.key(job_id, path), self.stream_part_bytes, self._pool, self._streaming
            )
            self._streams.setdefault(job_id, {})[writer.key] = writer
        return writer

    @_translated
    def keep_inputs(self, job_id: str) -> None:
        files = self.storage.job(job_id)
        with self._streams_lock:
            streams = dict(self._streams.get(job_id, {}))
        for _, path in self._inputs(files):
            key = self.key(job_id, path)
            writer = streams.get(key)
            if writer is not None and path.exists():
                writer.complete(path, self.transfer)  # streamed as the request arrived: only the last part is left
            elif writer is not None:
                writer.abort()  # a part the submission did not keep
            elif path.exists():  # the spec; or a file that arrived other than through the request's parser
                self.client.upload_file(str(path), self.bucket, key, Config=self.transfer)
        shutil.rmtree(files.root, ignore_errors=True)  # the API host keeps nothing of the job

    def drop_streams(self, job_id: str) -> None:
        with self._streams_lock:
            streams = self._streams.pop(job_id, {})
        failures = []
        for writer in streams.values():
            try:
                writer.abort()
            except Exception as error:  # the others are still aborted; delete's sweep retries this one
                failures.append(error)
        if failures:
            raise StoreUnavailable(f"object store s3://{self.bucket}: {failures[0]}") from failures[0]

    # ------------------------------------------------------------------ supervisor

    @_translated
    def workspace(self, job_id: str, attempt: int, digests: dict[str, str] | None = None) -> JobFiles:
        # Private to the attempt: a superseded attempt on this host (a partition) keeps its own files.
        files = JobFiles(self.storage.data_dir / "work" / str(attempt) / job_id)
        shutil.rmtree(files.root, ignore_errors=True)
        named = self._names(job_id, f"{self.prefix}jobs/{job_id}/")
        canonical = self.storage.job(job_id)
        for name, path in self._inputs(canonical):
            key = self.key(job_id, path)
            if key not in named:
                if path in (canonical.input_model, canonical.spec):
                    raise InputsMissing(f"{key} is not in bucket {self.bucket}")
                continue
            target = files.root / path.relative_to(canonical.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, key, str(target), Config=self.transfer)
            # End to end: the parts travel without payload signatures (see ``S3Objects.__init__``), and a
            # store or a network can corrupt bytes; the record's digest is the upload's own.
            expected = (digests or {}).get(name)
            if expected and (found := file_sha256(target)) != expected:
                raise InputsCorrupt(
                    f"{key} in bucket {self.bucket} does not match the upload (SHA-256 {found} instead of {expected})"
                )
        return files

    @_translated
    def publish(self, job_id: str, attempt: int, files: JobFiles, report: dict[str, Any]) -> Path:
        # The workspace is this attempt's alone: nobody else writes its output while it is uploaded.
        canonical = self.storage.job(job_id)
        self.client.upload_file(
            str(files.output_model),
            self.bucket,
            self.key(job_id, canonical.published_model(attempt)),
            ExtraArgs={"Metadata": {"sha256": file_sha256(files.output_model)}},
            Config=self.transfer,
        )
        fault_point("mid-publish", job_id, self.storage.data_dir)  # fault tests: the model is up, the report not yet
        self.publish_report(job_id, attempt, report)
        return files.output_model

    @_translated
    def publish_artifact(self, job_id: str, attempt: int, files: JobFiles, file_name: str) -> tuple[int, str]:
        with opened_plain(files.output_artifact(file_name)) as handle:  # the workspace is this attempt's alone
            size, digest = measure(handle)
            handle.seek(0)
            self.client.upload_fileobj(
                handle,
                self.bucket,
                self.key(job_id, self.storage.job(job_id).published_artifact(attempt, file_name)),
                ExtraArgs={"Metadata": {"sha256": digest}},
                Config=self.transfer,
            )
        return size, digest

    @_translated
    def publish_report(self, job_id: str, attempt: int, report: dict[str, Any]) -> None:
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.key(job_id, self.storage.job(job_id).published_report(attempt)),
            Body=json.dumps(report, indent=2, sort_keys=True).encode(),
            ContentType="application/json",
        )

    @_translated
    def withdraw(self, job_id: str, attempt: int) -> None:
        canonical = self.storage.job(job_id)
        self.client.delete_objects(
            Bucket=self.bucket,
            Delete={
                "Objects": [
                    {"Key": self.key(job_id, path)}
                    for path in (
                        canonical.published_model(attempt),
                        canonical.published_report(attempt),
                        *(canonical.published_artifact(attempt, name) for name in sorted(ARTIFACT_FILE_NAMES)),
                    )
                ]
            },
        )

    def release(self, job_id: str, attempt: int) -> None:
        work = self.storage.data_dir / "work" / str(attempt)
        shutil.rmtree(work / job_id, ignore_errors=True)
        try:
            work.rmdir()
        except OSError:
            pass  # another job's attempt of that number is still here

    # ------------------------------------------------------------------ API: download, report, delete

    def model(self, job_id: str, attempt: int | None) -> RemoteObject:
        return self.published(job_id, self.storage.job(job_id).published_model(attempt))

    def artifact(self, job_id: str, attempt: int | None, file_name: str) -> RemoteObject:
        return self.published(job_id, self.storage.job(job_id).published_artifact(attempt, file_name))

    @_translated
    def published(self, job_id: str, path: Path) -> RemoteObject:
        """The object of one of the job's published files, named by its local path (``JobFiles``)."""
        key = self.key(job_id, path)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        return RemoteObject(key, int(answer["ContentLength"]), answer["Body"])

    @_translated
    def presigned_url(self, key: str, download_name: str) -> str:
        return self.client.generate_presigned_url(
            "get_object",
            ExpiresIn=self.presign_s,
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ResponseContentType": "application/octet-stream",
                "ResponseContentDisposition": f'attachment; filename="{download_name}"',
            },
        )

    @_translated
    def read_report(self, job_id: str, attempt: int | None) -> dict[str, Any]:
        key = self.key(job_id, self.storage.job(job_id).published_report(attempt))
        try:
            return json.load(self.client.get_object(Bucket=self.bucket, Key=key)["Body"])
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None

    @_translated
    def delete(self, job_id: str) -> None:
        self.drop_streams(job_id)  # a refused submission: its uploads in flight stop before the sweep below
        self.storage.delete(job_id)  # a submission's spooled files on the API host
        for workspace in (self.storage.data_dir / "work").glob(f"*/{job_id}"):  # left by a worker killed here
            shutil.rmtree(workspace, ignore_errors=True)
        prefix = f"{self.prefix}jobs/{job_id}/"
        names = sorted(self._names(job_id, prefix))
        for start in range(0, len(names), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in names[start : start + 1000]]}
            )
        # Parts of an upload whose worker died are invisible, but they take space until aborted.
        try:
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
        except self.client.exceptions.ClientError:
            uploads = []  # a store without the call; its lifecycle rules clean up
        for upload in uploads:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def _names(self, job_id: str, prefix: str) -> set[str]:
        names: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            names.update(item["Key"] for item in page.get("Contents", []))
        return names


def open_object_store(settings: Settings, storage: Storage | None = None) -> ObjectStore:
    """The store ``MODELPRESS_STORAGE_URL`` names: unset, the data directory."""
    storage = storage or Storage(settings.data_dir)
    if not settings.storage_url:
        return LocalObjects(storage)
    return S3Objects(storage, settings)
