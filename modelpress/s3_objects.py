"""A job's files in an S3-compatible bucket (``MODELPRESS_STORAGE_URL=s3://bucket/prefix``), through
boto3: the ``ObjectStore`` of ``modelpress.objectstore`` for workers on many hosts with nothing
shared but Redis and the bucket. See docs/architecture.md, "Object storage".
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from modelpress.artifacts import file_sha256, measure, opened_plain
from modelpress.config import Settings
from modelpress.fault_injection import fault_point
from modelpress.objectstore import InputsCorrupt, InputsMissing, ObjectStore, RemoteObject, StoreUnavailable
from modelpress.partstream import MAX_PARTS, PartStream
from modelpress.s3clients import s3_clients
from modelpress.storage import ARTIFACT_FILE_NAMES, JobFiles, Storage

# Multipart from 16 MB in 16 MB parts, 8 at a time: at most ~128 MB of one transfer is in memory.
PART_BYTES = 16 << 20
TRANSFER_THREADS = 8
# Uploads of one API process that stream while they arrive. An API process serves each connection
# on a greenlet (modelpress/apiserver.py), so nothing else bounds how many uploads buffer parts at
# once: past this, an upload only spools and is sent from the spool when the request completes,
# which keeps an API process's part buffers under STREAMING_UPLOADS x 80 MB.
STREAMING_UPLOADS = 8


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
