"""Files in and out of the API: uploads stream to disk as they arrive (never held whole in memory,
hashed on the way); downloads can be gzip-compressed once and kept."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from flask import Request, current_app
from werkzeug.datastructures import FileStorage


class HashingSpoolFile:
    """A named temp file in the data directory that counts bytes and computes SHA-256 as it is written."""

    def __init__(self, directory: Path) -> None:
        self._file: IO[bytes] = tempfile.NamedTemporaryFile(dir=directory, prefix="upload-", delete=True)
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    @property
    def name(self) -> str:
        return self._file.name

    def write(self, chunk: bytes) -> int:
        self.sha256.update(chunk)
        self.bytes += len(chunk)
        return self._file.write(chunk)

    def __getattr__(self, attribute: str) -> Any:  # read, seek, tell, flush, close ...
        return getattr(self._file, attribute)


class StreamingRequest(Request):
    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):  # type: ignore[override]
        return HashingSpoolFile(current_app.extensions["modelpress_storage"].uploads_dir)


def keep_upload(upload: FileStorage, destination: Path) -> dict[str, Any]:
    """Link the spooled upload into the job directory; return its size and digest.

    A hard link, so the temp file can still be deleted when the request closes.
    """
    stream = upload.stream
    destination.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(stream, HashingSpoolFile):
        stream.flush()
        os.link(stream.name, destination)
        return {"filename": upload.filename or destination.name, "bytes": stream.bytes, "sha256": stream.sha256.hexdigest()}
    # Small parts can arrive in memory (werkzeug decides); copy them the same way.
    digest, size = hashlib.sha256(), 0
    with open(destination, "wb") as handle:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
            handle.write(chunk)
    return {"filename": upload.filename or destination.name, "bytes": size, "sha256": digest.hexdigest()}


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
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as packed, \
                    open(path, "rb") as source:
                shutil.copyfileobj(source, packed, 1 << 20)
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
    return target
