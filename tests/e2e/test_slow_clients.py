"""Slow clients cannot starve the API: while many more connections than the former gthread pool had
threads (2 processes x 4) send their request heads or upload bodies a few bytes at a time,
/healthz and another tenant's poll are answered; a head not complete in time gets 408 and the
connection is closed; an upload that stalls is ended and its spool file removed. Positive
controls: a slow head and a slow upload that do complete in time are served as usual.

(Against MODELPRESS_API_SERVER=gthread, the former model, the first probe times out.)
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from modelpress.stack import Stack
from tests.conftest import ApiClient, make_settings, write_keys
from tests.models import SmallConvNet, save_scripted

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
KEYS = {"alpha": "mp_alpha-slow-key", "beta": "mp_beta-slow-key"}
HEADER_TIMEOUT_S = 10
BODY_TIMEOUT_S = 10
SLOW_HEADS = 40
SLOW_UPLOADS = 10
PROBE_TIMEOUT_S = 15  # generous: the bound within which a probe must be answered at all


class BallastConvNet(SmallConvNet):
    """SmallConvNet with a megabyte of buffer: half its upload is many of werkzeug's 64 KB reads, so
    a request stalled there has begun its spool file."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ballast", torch.zeros(1 << 18))


@dataclass
class Service:
    stack: Stack
    alpha: ApiClient
    beta: ApiClient
    model: bytes


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("slow-clients")
    write_keys(root / "keys", KEYS)
    settings = make_settings(
        root / "data",
        redis_url=None,
        api_keys_file=root / "keys",
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    stack = Stack(settings, log_dir=root / "logs")
    try:
        stack.start()
        clients = {}
        for tenant, key in KEYS.items():
            clients[tenant] = ApiClient(stack.base_url)
            clients[tenant].session.headers["Authorization"] = f"Bearer {key}"
        model = save_scripted(BallastConvNet(), root / "conv.pt").read_bytes()
        yield Service(stack, clients["alpha"], clients["beta"], model)
    finally:
        stack.stop()


class SlowConnection:
    """A raw connection that sends a request in pieces, when the test says."""

    def __init__(self, port: int, request: bytes) -> None:
        self.request, self.sent = request, 0
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S)

    def send(self, upto: int) -> None:
        self.socket.sendall(self.request[self.sent : upto])
        self.sent = upto

    def still_open(self) -> bool:
        """Nothing answered and not closed by the server (a peek that does not wait)."""
        self.socket.setblocking(False)
        try:
            self.socket.recv(1, socket.MSG_PEEK)
            return False  # an answer, or the end of the connection
        except BlockingIOError:
            return True
        finally:
            self.socket.setblocking(True)

    def answer(self, timeout: float) -> tuple[bytes, bool]:
        """Everything the server sends within ``timeout``, and whether it then closed the connection."""
        self.socket.settimeout(timeout)
        received = b""
        try:
            while chunk := self.socket.recv(65536):
                received += chunk
            return received, True
        except (TimeoutError, ConnectionResetError):
            return received, False

    def close(self) -> None:
        self.socket.close()


def slow_head(port: int) -> SlowConnection:
    connection = SlowConnection(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n")
    connection.send(len(b"GET /healthz HTTP/1.1\r\nHost: 127.0"))  # and then nothing, for now
    return connection


def slow_upload(port: int, model: bytes) -> SlowConnection:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{json.dumps(SPEC)}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="conv.pt"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + model
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS['alpha']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    connection = SlowConnection(port, head + body)
    connection.send(len(head) + len(body) // 2)  # half the model, and then nothing, for now
    return connection


def spooled_uploads(stack: Stack) -> list[Path]:
    """The spool files of uploads being read (one per request that has started its model part)."""
    return [path for path in (stack.settings.data_dir / "uploads").iterdir() if path.stat().st_size > 0]


def test_health_and_another_tenants_poll_answer_while_slow_clients_hold_connections(service: Service) -> None:
    stack = service.stack
    job_id = service.beta.wait(service.beta.submit(service.model, SPEC).json()["id"], timeout=120)["id"]
    jobs_before = {p.name for p in (stack.settings.data_dir / "jobs").iterdir()}
    heads = [slow_head(stack.settings.port) for _ in range(SLOW_HEADS)]
    uploads = [slow_upload(stack.settings.port, service.model) for _ in range(SLOW_UPLOADS)]
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while time.monotonic() < deadline and len(spooled_uploads(stack)) < SLOW_UPLOADS:
            time.sleep(0.05)

        health = requests.get(f"{stack.base_url}/healthz", timeout=PROBE_TIMEOUT_S)
        poll = service.beta.session.get(service.beta.url(f"/v1/jobs/{job_id}"), timeout=PROBE_TIMEOUT_S)
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert poll.status_code == 200 and (poll.json()["id"], poll.json()["state"]) == (job_id, "succeeded")
        # The attack was live all along: every slow upload is being read, and every slow connection
        # is still open and unanswered.
        assert len(spooled_uploads(stack)) == SLOW_UPLOADS
        assert [c.still_open() for c in heads + uploads] == [True] * (SLOW_HEADS + SLOW_UPLOADS)

        # Positive controls: a slow head and a slow upload that complete in time are served as usual.
        heads[0].send(len(heads[0].request))
        answer, closed = heads[0].answer(PROBE_TIMEOUT_S)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}\n') and closed
        uploads[0].send(len(uploads[0].request))
        answer, closed = uploads[0].answer(PROBE_TIMEOUT_S)
        assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
        created = json.loads(answer.split(b"\r\n\r\n", 1)[1])["id"]
        assert service.alpha.wait(created, timeout=120)["state"] == "succeeded"

        # The rest never complete: each is answered 408 and closed by the server, within a bound.
        for connection in heads[1:]:
            answer, closed = connection.answer(HEADER_TIMEOUT_S + PROBE_TIMEOUT_S)
            assert answer.startswith(b"HTTP/1.1 408") and closed, answer[:200]
        for connection in uploads[1:]:
            answer, closed = connection.answer(BODY_TIMEOUT_S + PROBE_TIMEOUT_S)
            assert answer.startswith(b"HTTP/1.1 408") and closed, answer[:200]
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == 408
        # Their spool files are gone and no job folder was left for them.
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while time.monotonic() < deadline and spooled_uploads(stack):
            time.sleep(0.05)
        assert spooled_uploads(stack) == []
        assert {p.name for p in (stack.settings.data_dir / "jobs").iterdir()} == jobs_before | {created}
    finally:
        for connection in heads + uploads:
            connection.close()


def _archive_with_code(model: bytes, code: str) -> bytes:
    """The TorchScript archive ``model`` with one more ``code/`` file holding ``code``."""
    import io
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(model))
    root = source.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for entry in source.infolist():
            archive.writestr(entry, source.read(entry.filename))
        archive.writestr(f"{root}/code/__torch__/padding.py", code)
    return out.getvalue()


def test_a_submission_whose_checks_take_seconds_does_not_hold_its_api_process(tmp_path: Path) -> None:
    """A greenlet is never preempted: the archive checks of an upload (here tokenizing 4 MB of
    TorchScript code that names a suspect operator, which takes seconds) run on an OS thread, so
    the same API process (the only one here) keeps answering /healthz meanwhile."""
    settings = make_settings(tmp_path / "data", redis_url=None, api_workers=1)
    stack = Stack(settings, log_dir=tmp_path / "logs").start(worker=False)
    try:
        model = save_scripted(SmallConvNet(), tmp_path / "conv.pt").read_bytes()
        line = "def f(self, x):\n    return torch.ops.aten.relu(x)  # ops, line after line\n"
        code = line * ((4 << 20) // len(line)) + "y = torch.from_file('/etc/hostname')\n"
        upload = slow_upload(settings.port, _archive_with_code(model, code))
        upload.send(len(upload.request))  # all of it: the API reads it, then checks the archive
        answered_meanwhile = 0
        while upload.still_open():
            health = requests.get(f"{stack.base_url}/healthz", timeout=PROBE_TIMEOUT_S)
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            answered_meanwhile += upload.still_open()  # counted only if the submission is still unanswered
        answer, _ = upload.answer(PROBE_TIMEOUT_S)
        # The check did run to the end of the code: the refusal names the operator on its last line.
        assert answer.startswith(b"HTTP/1.1 422"), answer[:300]
        assert "aten::from_file" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["errors"]["model"][0]
        # Measured: about 200 probes answered meanwhile; 3 with the check on the event loop (the ones
        # answered while the upload was still being read).
        assert answered_meanwhile >= 30
        upload.close()
    finally:
        stack.stop()
