"""Downloads of a job's published files (the model, export-target artifacts), one code path for both.

From the data directory: ``send_file`` (ETag, conditional requests, Range), gzip from a cached copy
when asked. From an object store: streamed through the API in 1 MB chunks (never whole in memory),
gzip-compressed on the fly when asked, or a short-lived presigned redirect when the operator enables
``MODELPRESS_S3_PRESIGN_S``. ETag and ``X-Checksum-Sha256`` are the file's SHA-256 either way, so
clients see no difference."""

from __future__ import annotations

import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from flask import Response, request, send_file
from werkzeug.http import dump_options_header

from modelpress.objectstore import LocalObjects, ObjectStore, S3Objects
from service.problems import ApiProblem
from service.uploads import gzip_copy, wants_gzip


def published_file_response(
    objects: ObjectStore,
    job_id: str,
    path: Path,
    digest: str,
    download_name: str,
    media_type: str = "application/octet-stream",
) -> Response:
    """Serve one of the job's published files: ``path`` is its local name (``JobFiles.published_model``,
    ``published_artifact``), ``digest`` the SHA-256 the supervisor measured on what it published."""
    gzipped = wants_gzip(request)
    if not isinstance(objects, LocalObjects):  # an object store: streamed, or a presigned redirect
        return _remote_response(objects, job_id, path, digest, download_name, gzipped, media_type)
    response = send_file(
        gzip_copy(path) if gzipped else path,
        mimetype=media_type,
        as_attachment=True,
        download_name=download_name,
        etag=f"{digest}-gzip" if gzipped else digest,
        conditional=True,
        max_age=0,
    )
    if gzipped:
        response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept-Encoding"
    response.headers["X-Checksum-Sha256"] = digest  # of the file itself, after any decoding
    return response


def _remote_response(
    objects: S3Objects, job_id: str, path: Path, digest: str, download_name: str, gzipped: bool, media_type: str
) -> Response:
    etag = f"{digest}-gzip" if gzipped else digest
    headers = {
        "ETag": f'"{etag}"',
        "X-Checksum-Sha256": digest,
        "Vary": "Accept-Encoding",
        "Cache-Control": "no-cache",
        "Accept-Ranges": "none",
    }
    if request.if_none_match.contains(etag):
        return Response(status=304, headers=headers)
    if objects.presign_s and not gzipped:
        key = objects.key(job_id, path)
        # The redirect itself is private: the URL in it is a credential for presign_s seconds.
        return Response(
            status=307,
            headers={**headers, "Cache-Control": "no-store", "Location": objects.presigned_url(key, download_name)},
        )
    try:
        remote = objects.published(job_id, path)
    except FileNotFoundError:  # removed between the record read and now (DELETE, retention)
        raise ApiProblem(404, "Not Found", f"no job with id {job_id!r}") from None
    headers["Content-Disposition"] = _attachment(download_name)
    if gzipped:
        headers["Content-Encoding"] = "gzip"
        return Response(_gzip(remote.chunks()), headers=headers, mimetype=media_type)
    headers["Content-Length"] = str(remote.size)
    return Response(remote.chunks(), headers=headers, mimetype=media_type)


def _gzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: a gzip header (mtime 0), as the local copies have
    for chunk in chunks:
        packed = packer.compress(chunk)
        if packed:
            yield packed
    yield packer.flush()


def _attachment(name: str) -> str:
    """``attachment; filename=...`` as werkzeug's send_file writes it (RFC 6266 for non-ASCII names)."""
    try:
        name.encode("ascii")
        return dump_options_header("attachment", {"filename": name})
    except UnicodeEncodeError:
        simple = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
        return dump_options_header(
            "attachment", {"filename": simple, "filename*": f"UTF-8''{quote(name, safe='!#$&+^`|~')}"}
        )
