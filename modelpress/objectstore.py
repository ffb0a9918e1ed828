"""Where a job's files are kept between the API and the workers: the local data directory (the
default, one host or a shared volume) or an S3-compatible object store (``MODELPRESS_STORAGE_URL=
s3://bucket/prefix``, workers on many hosts with nothing shared but Redis and the bucket).

Both keep the names of ``modelpress.storage.JobFiles``, relative to the job's root: ``input/model.pt``,
``input/student.pt``, ``input/data``, ``spec.json``, ``model.attempt-<N>.pt``, ``report.attempt-<N>.json``;
in S3 under ``<prefix>jobs/<id>/``. The job's process always works in a local directory
(``workspace``): with S3 the supervisor stages the inputs there, and uploads the output after.

A reader never sees a partial result, in either store: the served names carry the attempt that
recorded success, that attempt writes them before its final state, and an S3 object (a multipart
upload too) becomes visible only once complete. The report goes last.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from modelpress.config import Settings
from modelpress.faults import pause_point
from modelpress.storage import JobFiles, Storage, read_json, write_json_atomic

# Multipart from 16 MB in 16 MB parts, 8 at a time: at most ~128 MB of one transfer is in memory.
PART_BYTES = 16 << 20
TRANSFER_THREADS = 8
STREAM_CHUNK = 1 << 20


class InputsMissing(Exception):
    """The job's inputs are not in the store (the job was deleted, or the bucket emptied)."""


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

    @abstractmethod
    def keep_inputs(self, job_id: str) -> None:
        """API, after the checks and before the record: make the inputs and spec reachable by any worker."""

    @abstractmethod
    def workspace(self, job_id: str, attempt: int) -> JobFiles:
        """Supervisor: the local directory where this attempt's process runs, inputs in place.
        Raises ``InputsMissing`` when the inputs are gone."""

    @abstractmethod
    def publish(self, job_id: str, attempt: int, files: JobFiles, report: dict[str, Any]) -> Path:
        """Supervisor: publish this attempt's output model and report under its attempt's names.
        Returns a local file with the very bytes published (to hash for the job's result)."""

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
    def read_report(self, job_id: str, attempt: int | None) -> dict[str, Any]:
        """API: the published report (``FileNotFoundError`` when it is gone)."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """API (DELETE, a rolled-back submission) and reaper (retention): every file of the job."""


class LocalObjects(ObjectStore):
    """The data directory itself: what ModelPress always did, unchanged (one host or a shared volume)."""

    def keep_inputs(self, job_id: str) -> None:
        pass  # the upload is already in the job's directory, which every worker sees

    def workspace(self, job_id: str, attempt: int) -> JobFiles:
        return self.storage.job(job_id)

    def publish(self, job_id: str, attempt: int, files: JobFiles, report: dict[str, Any]) -> Path:
        # The child writes ``output/model.pt`` by rename, so a hard link names one complete file that
        # nobody writes again, even if a superseded child (alive during a partition) renames another
        # file over the shared name: hashing the link hashes what is served.
        model = files.published_model(attempt)
        model.unlink(missing_ok=True)
        model.hardlink_to(files.output_model)
        write_json_atomic(files.published_report(attempt), report)
        return model

    def withdraw(self, job_id: str, attempt: int) -> None:
        files = self.storage.job(job_id)
        files.published_model(attempt).unlink(missing_ok=True)
        files.published_report(attempt).unlink(missing_ok=True)

    def release(self, job_id: str, attempt: int) -> None:
        pass  # the job's directory is where the API serves from

    def model(self, job_id: str, attempt: int | None) -> Path:
        return self.storage.job(job_id).published_model(attempt)

    def read_report(self, job_id: str, attempt: int | None) -> dict[str, Any]:
        return read_json(self.storage.job(job_id).published_report(attempt))

    def delete(self, job_id: str) -> None:
        self.storage.delete(job_id)


class S3Objects(ObjectStore):
    """An S3-compatible bucket through boto3; see docs/decisions.md, "Object storage"."""

    def __init__(self, storage: Storage, settings: Settings) -> None:
        super().__init__(storage)
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        location = urlparse(settings.storage_url or "")
        if location.scheme != "s3" or not location.netloc:
            raise ValueError(f"MODELPRESS_STORAGE_URL must look like s3://bucket/prefix, got {settings.storage_url!r}")
        self.bucket = location.netloc
        prefix = location.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.presign_s = settings.s3_presign_s
        # Unset overrides leave boto3's own chain: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, the key
        # variables, AWS_PROFILE and ~/.aws, instance roles.
        session = boto3.session.Session(profile_name=settings.s3_profile or None)
        self.client = session.client(
            "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region or None,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            # SigV4 everywhere: presigned URLs otherwise fall back to SigV2, which AWS refuses in newer
            # regions and SeaweedFS refuses once response-content-disposition is signed.
            # Checksums only where the API requires them: the SHA-256 is ours already (computed as the
            # upload arrives, stored as metadata and in the record), and a CRC32 of every part costs CPU.
            config=Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 5},
                          connect_timeout=5, read_timeout=60, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          s3={"addressing_style": "path"} if (settings.s3_endpoint_url or _env_endpoint()) else None),
        )
        self.transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                       max_concurrency=TRANSFER_THREADS, use_threads=True)

    def key(self, job_id: str, path: Path) -> str:
        """The object key of one of the job's files, from its local path (one naming for both stores)."""
        files = self.storage.job(job_id)
        return f"{self.prefix}jobs/{job_id}/{path.relative_to(files.root).as_posix()}"

    def _inputs(self, files: JobFiles) -> tuple[Path, ...]:
        return files.input_model, files.input_student, files.input_data, files.spec

    # ------------------------------------------------------------------ API: submit

    @_translated
    def keep_inputs(self, job_id: str) -> None:
        files = self.storage.job(job_id)
        for path in self._inputs(files):
            if path.exists():
                self.client.upload_file(str(path), self.bucket, self.key(job_id, path), Config=self.transfer)
        shutil.rmtree(files.root, ignore_errors=True)  # the API host keeps nothing of the job

    # ------------------------------------------------------------------ supervisor

    @_translated
    def workspace(self, job_id: str, attempt: int) -> JobFiles:
        # Private to the attempt: a superseded attempt on this host (a partition) keeps its own files.
        files = JobFiles(self.storage.data_dir / "work" / str(attempt) / job_id)
        shutil.rmtree(files.root, ignore_errors=True)
        named = self._names(job_id, f"{self.prefix}jobs/{job_id}/")
        canonical = self.storage.job(job_id)
        for path in self._inputs(canonical):
            key = self.key(job_id, path)
            if key not in named:
                if path in (canonical.input_model, canonical.spec):
                    raise InputsMissing(f"{key} is not in bucket {self.bucket}")
                continue
            target = files.root / path.relative_to(canonical.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, key, str(target), Config=self.transfer)
        return files

    @_translated
    def publish(self, job_id: str, attempt: int, files: JobFiles, report: dict[str, Any]) -> Path:
        # The workspace is this attempt's alone: nobody else writes its output while it is uploaded.
        canonical = self.storage.job(job_id)
        self.client.upload_file(str(files.output_model), self.bucket, self.key(job_id, canonical.published_model(attempt)),
                                ExtraArgs={"Metadata": {"sha256": file_sha256(files.output_model)}}, Config=self.transfer)
        pause_point("mid-publish", job_id)  # fault tests: the model is up, the report not yet
        self.client.put_object(Bucket=self.bucket, Key=self.key(job_id, canonical.published_report(attempt)),
                               Body=json.dumps(report, indent=2, sort_keys=True).encode(),
                               ContentType="application/json")
        return files.output_model

    @_translated
    def withdraw(self, job_id: str, attempt: int) -> None:
        canonical = self.storage.job(job_id)
        self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [
            {"Key": self.key(job_id, canonical.published_model(attempt))},
            {"Key": self.key(job_id, canonical.published_report(attempt))}]})

    def release(self, job_id: str, attempt: int) -> None:
        work = self.storage.data_dir / "work" / str(attempt)
        shutil.rmtree(work / job_id, ignore_errors=True)
        try:
            work.rmdir()
        except OSError:
            pass  # another job's attempt of that number is still here

    # ------------------------------------------------------------------ API: download, report, delete

    @_translated
    def model(self, job_id: str, attempt: int | None) -> RemoteObject:
        key = self.key(job_id, self.storage.job(job_id).published_model(attempt))
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        return RemoteObject(key, int(answer["ContentLength"]), answer["Body"])

    @_translated
    def presigned_url(self, key: str, download_name: str) -> str:
        return self.client.generate_presigned_url("get_object", ExpiresIn=self.presign_s, Params={
            "Bucket": self.bucket, "Key": key, "ResponseContentType": "application/octet-stream",
            "ResponseContentDisposition": f'attachment; filename="{download_name}"'})

    @_translated
    def read_report(self, job_id: str, attempt: int | None) -> dict[str, Any]:
        key = self.key(job_id, self.storage.job(job_id).published_report(attempt))
        try:
            return json.load(self.client.get_object(Bucket=self.bucket, Key=key)["Body"])
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None

    @_translated
    def delete(self, job_id: str) -> None:
        self.storage.delete(job_id)  # a submission's spooled files on the API host
        for workspace in (self.storage.data_dir / "work").glob(f"*/{job_id}"):  # left by a worker killed here
            shutil.rmtree(workspace, ignore_errors=True)
        prefix = f"{self.prefix}jobs/{job_id}/"
        names = sorted(self._names(job_id, prefix))
        for start in range(0, len(names), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in names[start:start + 1000]]})
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


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _env_endpoint() -> str | None:
    import os

    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
