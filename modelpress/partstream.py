"""An uploaded file on its way to its S3 object while the request is still arriving (S3 mode).

``modelpress.objectstore.S3Objects.stream_writer`` makes one per file part of a submission; the
request's parser writes the bytes as they come, and every part goes to an S3 multipart upload from
the store's thread pool.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

# At most this many parts of one upload in flight, plus the one filling, so a 16 MB part size
# holds at most 80 MB of one upload in memory.
PARTS_IN_FLIGHT = 4
MAX_PARTS = 10_000  # S3's limit per multipart upload


class PartStream:
    """One uploaded file on its way to its object while the request is still arriving: ``write`` (from
    the request's thread) collects bytes, and every ``part_bytes`` goes to an S3 multipart upload from
    a shared thread pool. At most ``PARTS_IN_FLIGHT`` parts are in flight: when the store is slower
    than the client, ``write`` waits, so the request is read more slowly instead of filling memory.

    Nothing is visible in the bucket until ``complete``; ``abort`` (a refused request) first waits for
    the parts in flight, since a part that lands after the abort would keep taking space. A file
    smaller than one part never starts a multipart upload: ``complete`` sends it from the spool. A
    store error stops the streaming (the request still spools locally) and ``complete`` raises it.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        part_bytes: int,
        pool: ThreadPoolExecutor,
        streaming: threading.Semaphore | None = None,
    ) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        # Without one of the process's streaming slots the file only spools; ``complete`` sends it whole.
        self._streaming = streaming if streaming is not None and streaming.acquire(blocking=False) else None
        self.part_bytes = part_bytes
        self._pool = pool
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._slots = threading.BoundedSemaphore(PARTS_IN_FLIGHT)
        self._parts: list[Future] = []
        self.upload_id: str | None = None
        self.bytes = 0
        self.error: BaseException | None = None
        self.ended = False  # the request's part is complete: the last part is sent
        self.state = "open"  # then "completed" or "aborted"

    def write(self, chunk: bytes) -> None:
        if self.ended or self.state != "open":
            raise ValueError(f"{self.key}: written after its end")
        self.bytes += len(chunk)
        if self.error is not None or self._streaming is None:
            return  # already failed (the spool still takes the bytes, complete() raises), or spool only
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= self.part_bytes:
            self._send()

    def end(self) -> None:
        """The file part is over: send what is left as the last part (a multipart upload only; a small
        file waits for ``complete``, which sends it whole from the spool)."""
        if self.ended:
            return
        self.ended = True
        if self.upload_id is not None and self._buffered and self.error is None:
            self._send()
        self._chunks, self._buffered = [], 0

    def _send(self) -> None:
        body = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        try:
            if self.upload_id is None:
                self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
            if len(self._parts) >= MAX_PARTS:
                raise ValueError(f"{self.key}: more than {MAX_PARTS} parts; raise MODELPRESS_S3_PART_MB")
        except Exception as error:
            self.error = error
            return
        self._slots.acquire()  # backpressure: wait while PARTS_IN_FLIGHT parts are on their way
        if self.state != "open":  # aborted from another thread meanwhile
            self._slots.release()
            return
        self._parts.append(self._pool.submit(self._upload_part, len(self._parts) + 1, body))

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        try:
            if self.error is not None or self.state != "open":
                raise RuntimeError("skipped: the upload already failed or was aborted")
            answer = self.client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}
        except Exception as error:
            if self.error is None:
                self.error = error
            raise
        finally:
            self._slots.release()

    def complete(self, path: Path, transfer: Any) -> None:
        """Publish the object; ``path`` is the local spool of the same bytes (it sends a small file whole)."""
        self.end()
        wait(self._parts)
        if self.error is not None:
            raise self.error
        if self.upload_id is None:
            self.client.upload_file(str(path), self.bucket, self.key, Config=transfer)
        else:
            if self.bytes != path.stat().st_size:  # every byte of the spool went to a part
                raise RuntimeError(f"{self.key}: streamed {self.bytes} bytes, the spool holds {path.stat().st_size}")
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": [part.result() for part in self._parts]},
            )
        self.state = "completed"
        self._release_slot()

    def abort(self) -> None:
        if self.state != "open":
            return
        self.state = "aborted"
        wait(self._parts)  # parts in flight finish (or fail) first; later ones are skipped
        self._release_slot()
        if self.upload_id is not None:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)

    def _release_slot(self) -> None:
        slot, self._streaming = self._streaming, None
        if slot is not None:
            slot.release()
