"""Files in and out of the API: uploads stream to disk as they arrive (never held whole in memory,
hashed on the way, and with an object store also sent to the bucket part by part); downloads can be
gzip-compressed once and kept."""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import redis
from flask import Request, current_app
from werkzeug.datastructures import FileStorage
from werkzeug.formparser import FormDataParser, MultiPartParser

from modelpress.jobs import JobStore, new_job_id
from modelpress.objectstore import ObjectStore
from modelpress.partstream import PartStream
from modelpress.storage import JobFiles

ACTIVE_NOTE_S = 30.0  # how often a streaming upload tells Redis it is alive (see ``track_upload``)
MAX_FILENAME_CHARS = 200

# The file parts a submission keeps, and the job file each becomes.
UPLOAD_FIELDS = {"model": "input_model", "student": "input_student", "data": "input_data"}


def upload_path(files: JobFiles, field: str) -> Path:
    return getattr(files, UPLOAD_FIELDS[field])


log = logging.getLogger("modelpress.api")


class HashingSpoolFile:
    """A named temp file in the data directory that counts bytes and computes SHA-256 as it is written,
    and feeds ``writer`` (the object store's, when there is one) the same bytes."""

    def __init__(self, directory: Path) -> None:
        self._file: IO[bytes] = tempfile.NamedTemporaryFile(dir=directory, prefix="upload-", delete=True)  # noqa: SIM115  the spool outlives __init__
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.writer: PartStream | None = None
        self.active: Callable[[], None] | None = None  # called at most every ACTIVE_NOTE_S while bytes arrive
        self._noted = time.monotonic()

    @property
    def name(self) -> str:
        return self._file.name

    def write(self, chunk: bytes) -> int:
        self.sha256.update(chunk)
        self.bytes += len(chunk)
        if self.writer is not None:
            self.writer.write(chunk)
        if self.active is not None and time.monotonic() - self._noted > ACTIVE_NOTE_S:
            self._noted = time.monotonic()
            self.active()
        return self._file.write(chunk)

    def seek(self, *args: Any) -> int:
        # werkzeug rewinds each file part once it is complete: its last bytes can go to the store now,
        # while the submission checks the archive.
        if self.writer is not None:
            self.writer.end()
        return self._file.seek(*args)

    def __getattr__(self, attribute: str) -> Any:  # read, seek, tell, flush, close ...
        return getattr(self._file, attribute)


class StreamingRequest(Request):
    """Spools file parts (``HashingSpoolFile``); with an object store, streams the submission's file
    parts to their objects as they arrive, under a job id made when the first of them starts
    (``upload_job_id``, which ``submit`` then uses). When the request ends, whatever ``keep_inputs``
    did not complete is aborted: a refused, failed or disconnected request leaves nothing in the bucket."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upload_job_id: str | None = None
        self._objects: ObjectStore | None = None
        self._fields_started: set[str] = set()

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):  # type: ignore[override]
        return HashingSpoolFile(current_app.extensions["modelpress_storage"].uploads_dir)

    def make_form_data_parser(self) -> FormDataParser:
        return _FieldAwareFormDataParser(
            self._file_part_started,
            stream_factory=self._get_file_stream,
            max_form_memory_size=self.max_form_memory_size,
            max_content_length=self.max_content_length,
            max_form_parts=self.max_form_parts,
            cls=self.parameter_storage_class,
        )

    def _file_part_started(self, field: str, spool: IO[bytes]) -> None:
        objects: ObjectStore = current_app.extensions["modelpress_objects"]
        if field not in UPLOAD_FIELDS or not isinstance(spool, HashingSpoolFile) or field in self._fields_started:
            return  # only the first part of a name is the submission's (``request.files.get``)
        self._fields_started.add(field)
        job_id = self.upload_job_id or new_job_id()
        path = upload_path(objects.storage.job(job_id), field)
        if objects.streams_to_store:  # noted before any part leaves, and again as the bytes arrive
            spool.active = functools.partial(track_upload, current_app.extensions["modelpress_jobs"], job_id, True)
            spool.active()
        spool.writer = objects.stream_writer(job_id, path)
        if spool.writer is not None:
            self.upload_job_id, self._objects = job_id, objects

    def close(self) -> None:
        try:
            if self._objects is not None:
                self._objects.drop_streams(self.upload_job_id)
        except Exception as error:  # the response is decided; a lifecycle rule on the bucket gets the rest
            log.warning("upload of job %s: unfinished parts not aborted (%s)", self.upload_job_id, error)
        finally:
            super().close()


class _FieldAwareFormDataParser(FormDataParser):
    """werkzeug's parser, telling ``file_part_started`` each file part's field name as the part starts
    (werkzeug's stream factory is not given it)."""

    def __init__(self, file_part_started: Callable[[str, IO[bytes]], None], **options: Any) -> None:
        super().__init__(**options)
        self.file_part_started = file_part_started

    def _parse_multipart(self, stream, mimetype, content_length, options):  # type: ignore[override]
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        parser = _FieldAwareMultiPartParser(
            self.file_part_started,
            stream_factory=self.stream_factory,
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.cls,
        )
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class _FieldAwareMultiPartParser(MultiPartParser):
    def __init__(self, file_part_started: Callable[[str, IO[bytes]], None], **options: Any) -> None:
        super().__init__(**options)
        self.file_part_started = file_part_started

    def start_file_streaming(self, event, total_content_length):  # type: ignore[override]
        container = super().start_file_streaming(event, total_content_length)
        self.file_part_started(event.name, container)
        return container


def track_upload(store: JobStore, job_id: str, active: bool) -> None:
    """Note that a request is writing files for ``job_id`` (``active``), or that it recorded the job
    or removed them; the reaper removes the files of an upload noted, never settled and idle for
    long (its API process was killed mid-request, ``modelpress.cleanup.remove_orphans``). Best
    effort: with Redis away the request cannot record a job anyway, and rolls its files back itself."""
    try:
        (store.upload_active if active else store.upload_settled)(job_id)
    except redis.RedisError as error:
        log.warning("upload of job %s: not %s in Redis (%s)", job_id, "noted" if active else "settled", error)


def keep_upload(upload: FileStorage, destination: Path) -> dict[str, Any]:
    """Link the spooled upload into the job directory; return its size and digest.

    A hard link, so the temp file can still be deleted when the request closes.
    """
    stream = upload.stream
    destination.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(stream, HashingSpoolFile):
        stream.flush()
        os.link(stream.name, destination)
        return {
            "filename": client_filename(upload.filename, destination.name),
            "bytes": stream.bytes,
            "sha256": stream.sha256.hexdigest(),
        }
    # Small parts can arrive in memory (werkzeug decides); copy them the same way.
    digest, size = hashlib.sha256(), 0
    with open(destination, "wb") as handle:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
            handle.write(chunk)
    return {"filename": client_filename(upload.filename, destination.name), "bytes": size, "sha256": digest.hexdigest()}


def client_filename(name: str | None, default: str) -> str:
    """A client's file name as it is kept, shown and offered back in a download's Content-Disposition.

    The name is the client's to choose (RFC 2231's ``filename*`` carries any byte, CR and LF
    included), so only a readable name is kept: its last path component, without control, format
    (bidirectional overrides) or line-separator characters, at most ``MAX_FILENAME_CHARS``;
    ``default`` when nothing readable remains.
    """
    name = re.split(r"[/\\]", unicodedata.normalize("NFC", name or ""))[-1]
    name = "".join(
        " " if unicodedata.category(char) == "Zs" else char
        for char in name
        if unicodedata.category(char)[0] not in "CZ" or unicodedata.category(char) == "Zs"
    )
    name = name.strip(" .")
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, suffix = name.rpartition(".")
        name = (
            stem[: MAX_FILENAME_CHARS - len(suffix) - 1] + dot + suffix
            if dot and len(suffix) <= 16
            else name[:MAX_FILENAME_CHARS]
        )
    return name or default


def upload_is_empty(upload: FileStorage) -> bool:
    stream = upload.stream
    if isinstance(stream, HashingSpoolFile):
        return stream.bytes == 0
    position = stream.tell()
    stream.seek(0, os.SEEK_END)
    empty = stream.tell() == 0
    stream.seek(position)
    return empty


def wants_gzip(request: Request) -> bool:
    """Whether Accept-Encoding allows gzip: ``gzip;q=0`` (or ``*;q=0`` with no gzip entry) refuses it."""
    return request.accept_encodings["gzip"] > 0


def gzip_copy(path: Path) -> Path:
    """``path`` + ``.gz``, made once (pruned weights compress well) and renamed into place when complete."""
    target = path.with_name(path.name + ".gz")
    if not target.exists():
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".gz.tmp")
        try:
            with (
                os.fdopen(fd, "wb") as raw,
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as packed,
                open(path, "rb") as source,
            ):
                shutil.copyfileobj(source, packed, 1 << 20)
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
    return target
