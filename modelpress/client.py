"""A small Python client for the ModelPress API; the ``modelpress`` command is built on it.

from modelpress.client import Client
client = Client("http://127.0.0.1:8000", api_key=None)
job = client.submit("model.pt", {"method": "quantize", "input_shape": [8, 512]})
job = client.wait(job, timeout=600)
client.download(job, "model.int8.pt")
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from modelpress.config import ClientSettings

FINAL_STATES = ("succeeded", "failed", "cancelled")
ByteProgress = Callable[[int, int], None]  # (bytes so far, total bytes)
Job = Mapping[str, Any]


class ModelPressError(Exception):
    """The service refused a request; ``problem`` is its problem+json body."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem = dict(problem)
        errors = problem.get("errors") or {}
        detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        super().__init__(
            f"{status} {problem.get('title', '')}: {detail}"
            + (f" {errors}" if errors and detail not in str(errors) else "")
        )


class ChecksumMismatch(Exception):
    """A downloaded file's SHA-256 differs from the one the service reported."""


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        defaults = ClientSettings.from_env()
        self.url = (url or defaults.url).rstrip("/")
        self.session = requests.Session()
        # A kept-alive connection the server (or a proxy) closed while idle fails the next request
        # sent on it; reads are safe to send again, a submission is not (use an Idempotency-Key).
        retries = Retry(
            total=3,
            connect=3,
            read=3,
            status=0,
            backoff_factor=0.2,
            allowed_methods=frozenset({"GET", "HEAD"}),
            raise_on_status=False,
        )
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=retries))
        key = api_key if api_key is not None else defaults.api_key
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout

    # ------------------------------------------------------------------ jobs

    def submit(
        self,
        model: str | os.PathLike,
        spec: Mapping[str, Any] | str,
        data: str | os.PathLike | None = None,
        student: str | os.PathLike | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        progress: ByteProgress | None = None,
    ) -> dict[str, Any]:
        """Upload a model (streamed from disk) with its spec; return the accepted job."""
        fields: list[tuple[str, str, Path | bytes]] = [
            ("spec", "", (spec if isinstance(spec, str) else json.dumps(spec)).encode()),
            ("model", Path(model).name, Path(model)),
        ]
        if data is not None:
            fields.append(("data", Path(data).name, Path(data)))
        if student is not None:
            fields.append(("student", Path(student).name, Path(student)))
        if callback_url is not None:
            fields.append(("callback_url", "", callback_url.encode()))
        body = _MultipartStream(fields, progress)
        headers = {"Content-Type": body.content_type, "Content-Length": str(len(body))}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        response = self.session.post(self.url + "/v1/jobs", data=body, headers=headers, timeout=self.timeout)
        return self._json(response, expected=(202,))

    def job(self, job: Job | str) -> dict[str, Any]:
        return self._json(self.session.get(self.url + f"/v1/jobs/{_id(job)}", timeout=self.timeout))

    def jobs(self, state: str | None = None, page_size: int = 50) -> Iterator[dict[str, Any]]:
        """Every job, newest first, following the cursor."""
        cursor = None
        while True:
            params = {
                "limit": page_size,
                **({"state": state} if state else {}),
                **({"cursor": cursor} if cursor else {}),
            }
            page = self._json(self.session.get(self.url + "/v1/jobs", params=params, timeout=self.timeout))
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def wait(
        self, job: Job | str, timeout: float = 3600.0, on_update: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Poll until the job is final (ETag and Retry-After keep it cheap); raise TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        etag, current = None, None
        while True:
            headers = {"If-None-Match": etag} if etag else {}
            response = self.session.get(self.url + f"/v1/jobs/{_id(job)}", headers=headers, timeout=self.timeout)
            if response.status_code != 304:
                current = self._json(response)
                etag = response.headers.get("ETag")
                if on_update is not None:
                    on_update(current)
                if current["state"] in FINAL_STATES:
                    return current
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {_id(job)} is still {current['state'] if current else 'unknown'} after {timeout} s"
                )
            time.sleep(min(float(response.headers.get("Retry-After", 1)), 5.0, max(deadline - time.monotonic(), 0.1)))

    def artifacts(self, job: Job | str) -> list[dict[str, Any]]:
        """The export-target artifacts of a succeeded job: one entry per target in its spec (made or failed, and why)."""
        return self._json(self.session.get(self.url + f"/v1/jobs/{_id(job)}/artifacts", timeout=self.timeout))[
            "artifacts"
        ]

    def download(
        self, job: Job | str, path: str | os.PathLike, progress: ByteProgress | None = None, target: str | None = None
    ) -> Path:
        """Save the compressed model, or with ``target`` (``onnx``, ...) that export target's artifact; verify its
        SHA-256 against the service's; return the path."""
        path = Path(path)
        what = "model" if target is None else f"artifacts/{quote(target, safe='')}"
        response = self.session.get(
            self.url + f"/v1/jobs/{_id(job)}/{what}",
            stream=True,
            timeout=self.timeout,
            headers={"Accept-Encoding": "identity"},
        )
        if response.status_code != 200:
            self._json(response)
        expected = response.headers["X-Checksum-Sha256"]
        total = int(response.headers.get("Content-Length", 0))
        digest, done = hashlib.sha256(), 0
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            with open(temporary, "wb") as handle:
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            if digest.hexdigest() != expected:
                raise ChecksumMismatch(f"downloaded SHA-256 {digest.hexdigest()} differs from the reported {expected}")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    def report(self, job: Job | str) -> dict[str, Any]:
        return self._json(self.session.get(self.url + f"/v1/jobs/{_id(job)}/report", timeout=self.timeout))

    def cancel(self, job: Job | str) -> dict[str, Any] | None:
        """Cancel a queued or running job (returns it), or delete a finished one (returns None)."""
        response = self.session.delete(self.url + f"/v1/jobs/{_id(job)}", timeout=self.timeout)
        return None if response.status_code == 204 else self._json(response, expected=(202,))

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _json(response: requests.Response, expected: tuple[int, ...] = (200,)) -> dict[str, Any]:
        if response.status_code in expected:
            return response.json()
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason, "detail": response.text[:500]}
        raise ModelPressError(response.status_code, problem)


def _id(job: Job | str) -> str:
    return job if isinstance(job, str) else job["id"]


class _MultipartStream:
    """multipart/form-data read from disk as requests sends it, with its length known up front."""

    def __init__(self, fields: list[tuple[str, str, Path | bytes]], progress: ByteProgress | None) -> None:
        self.boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._parts: list[bytes | Path] = []
        for name, filename, value in fields:
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            self._parts.append(
                f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n".encode()
            )
            self._parts.append(value)
            self._parts.append(b"\r\n")
        self._parts.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self._parts)
        self._progress = progress
        self._sent = 0
        self._chunks = self._iterate()

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def _iterate(self) -> Iterator[bytes]:
        for part in self._parts:
            if isinstance(part, Path):
                with open(part, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        yield self._count(chunk)
            else:
                yield self._count(part)

    def _count(self, chunk: bytes) -> bytes:
        self._sent += len(chunk)
        if self._progress is not None:
            self._progress(self._sent, self._length)
        return chunk
