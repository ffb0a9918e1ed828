"""Model downloads from an object store: streamed through the API in 1 MB chunks (never whole in
memory), gzip-compressed on the fly when asked, or a short-lived presigned redirect when the
operator enables ``MODELPRESS_S3_PRESIGN_S``. ETag and ``X-Checksum-Sha256`` are the model's
SHA-256 as for local files (``service.jobs_api.JobModel``), so clients see no difference."""
from __future__ import annotations

import unicodedata
import zlib
from typing import Iterator
from urllib.parse import quote

from flask import Response, request
from werkzeug.http import dump_options_header

from modelpress.objectstore import S3Objects
from service.problems import ApiProblem


def remote_model_response(objects: S3Objects, job_id: str, attempt: int | None, digest: str, download_name: str,
                          gzipped: bool) -> Response:
    etag = f"{digest}-gzip" if gzipped else digest
    headers = {"ETag": f'"{etag}"', "X-Checksum-Sha256": digest, "Vary": "Accept-Encoding",
               "Cache-Control": "no-cache", "Accept-Ranges": "none"}
    if request.if_none_match.contains(etag):
        return Response(status=304, headers=headers)
    if objects.presign_s and not gzipped:
        key = objects.key(job_id, objects.storage.job(job_id).published_model(attempt))
        # The redirect itself is private: the URL in it is a credential for presign_s seconds.
        return Response(status=307, headers={**headers, "Cache-Control": "no-store",
                                             "Location": objects.presigned_url(key, download_name)})
    try:
        remote = objects.model(job_id, attempt)
    except FileNotFoundError:  # removed between the record read and now (DELETE, retention)
        raise ApiProblem(404, "Not Found", f"no job with id {job_id!r}") from None
    headers["Content-Disposition"] = _attachment(download_name)
    if gzipped:
        headers["Content-Encoding"] = "gzip"
        return Response(_gzip(remote.chunks()), headers=headers, mimetype="application/octet-stream")
    headers["Content-Length"] = str(remote.size)
    return Response(remote.chunks(), headers=headers, mimetype="application/octet-stream")


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
        return dump_options_header("attachment", {"filename": simple,
                                                  "filename*": f"UTF-8''{quote(name, safe='!#$&+^`|~')}"})
