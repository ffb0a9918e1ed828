"""Many hosts, nothing shared but Redis and an S3 bucket: the API and two workers, each with its own
data directory, against a real SeaweedFS S3 server (``modelpress.seaweed``) started for this module.

Every method succeeds and downloads verify; a worker killed mid-job is taken over by the other;
DELETE and retention remove the objects (the bucket ends empty). Uploads stream to the bucket in
parts while the request arrives; a refused or abandoned request leaves nothing there.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from modelpress.fault_injection import arm
from modelpress.jobs import JobStore
from modelpress.seaweed import SeaweedServer
from modelpress.stack import Stack, free_port
from service import create_app
from tests.conftest import ApiClient, compression_process, job_folder, make_settings
from tests.e2e.test_distill_jobs import TinyColorNet
from tests.models import ResidualNet, SlowModel, SmallConvNet, save_scripted
from workers.celery_app import make_celery
from workers.reaper import Reaper

BUCKET = "modelpress-e2e"
STORAGE_URL = f"s3://{BUCKET}/many-hosts"
PREFIX = "many-hosts/jobs/"
EVALUATION = {"runs": 2, "warmup": 0}
SLOW = {"method": "quantize", "input_shape": [8, 64], "evaluation": {"runs": 20, "warmup": 0}}
PART_MB = 5  # the smallest part S3 allows: a 12 MB model streams in three parts


class Hosts:
    """Three "hosts": the API's (with Redis), worker a's and worker b's, each its own data directory."""

    def __init__(self, root: Path, s3: SeaweedServer) -> None:
        self.s3 = s3
        common = dict(storage_url=STORAGE_URL, job_threads=1, webhook_secret="shared-across-hosts", s3_part_mb=PART_MB)
        self.api = Stack(make_settings(root / "api-host", redis_url=None, **common), log_dir=root / "logs" / "api")
        self.api.start(worker=False)
        redis_url = self.api.settings.redis_url
        self.workers = {
            name: Stack(
                make_settings(root / f"{name}-host", redis_url=redis_url, **common), log_dir=root / "logs" / name
            )
            for name in ("a", "b")
        }
        for worker in self.workers.values():
            worker.start(api=False)
        self.client = ApiClient(self.api.base_url)

    def stop(self) -> None:
        for stack in (*self.workers.values(), self.api):
            stack.stop()

    def objects(self) -> list[str]:
        listing = self.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)
        return [item["Key"] for item in listing.get("Contents", [])]

    def unfinished_uploads(self) -> dict[str, str]:
        """Multipart uploads started and neither completed nor aborted: upload id -> key."""
        listing = self.s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX)
        return {upload["UploadId"]: upload["Key"] for upload in listing.get("Uploads", [])}

    def record(self, job_id: str) -> dict[str, Any]:
        return JobStore(redis.Redis.from_url(self.api.settings.redis_url)).get(job_id) or {}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("many-hosts")
    s3 = SeaweedServer(root / "s3", log_path=root / "logs" / "weed.log").start()
    variables = {**s3.environment(), "MODELPRESS_TEST_PAUSE": "mid-publish:120"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)  # the standard AWS variables (and a pause point), inherited by every host's processes
    running = None
    try:
        s3.create_bucket(BUCKET)
        running = Hosts(root, s3)
        yield running
    finally:
        if running is not None:
            running.stop()
        s3.stop(bound=3)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _verified(api: ApiClient, job: dict[str, Any]) -> bytes:
    assert job["state"] == "succeeded", job["error"]
    plain = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200
    assert plain.headers["ETag"] == f'"{job["result"]["sha256"]}"'
    assert hashlib.sha256(plain.content).hexdigest() == job["result"]["sha256"] == plain.headers["X-Checksum-Sha256"]
    assert len(plain.content) == job["result"]["bytes"]
    again = api.session.get(
        api.url(job["links"]["model"]), headers={"If-None-Match": plain.headers["ETag"], "Accept-Encoding": "identity"}
    )
    assert again.status_code == 304
    packed = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "gzip"}, stream=True)
    assert packed.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(packed.raw.read()) == plain.content
    report = api.session.get(api.url(job["links"]["report"]))
    assert report.status_code == 200 and report.json()["deliveries"] == job["deliveries"]
    return plain.content


def test_every_method_runs_on_workers_that_share_no_disk(hosts: Hosts, tmp_path: Path) -> None:
    api = hosts.client
    torch.manual_seed(0)
    residual = ResidualNet(width=8, classes=4).train()
    with torch.no_grad():
        for _ in range(3):
            residual(torch.randn(8, 3, 16, 16))
    residual_path = save_scripted(residual, tmp_path / "residual.pt")
    np.savez(
        tmp_path / "images.npz", inputs=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    )
    colour = torch.randn(32, 3, 32, 32)
    np.savez(tmp_path / "colour.npz", inputs=colour.numpy(), labels=np.arange(32) % 5)
    submissions = {
        "dynamic": (
            save_scripted(SmallConvNet(), tmp_path / "conv.pt"),
            {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": EVALUATION},
            {},
        ),
        "static": (
            residual_path,
            {
                "method": "quantize",
                "evaluation": EVALUATION,
                "quantize": {"mode": "static", "observer": "minmax", "calibration_batches": 1},
            },
            {"data": tmp_path / "images.npz"},
        ),
        "prune": (residual_path, {"method": "prune", "input_shape": [2, 3, 16, 16], "evaluation": EVALUATION}, {}),
        "distill": (
            save_scripted(TinyColorNet(), tmp_path / "teacher.pt"),
            {
                "method": "distill",
                "evaluation": EVALUATION,
                "distill": {"epochs": 1, "batch_size": 16, "student": {"from": "upload"}},
            },
            {"data": tmp_path / "colour.npz", "student": save_scripted(TinyColorNet(width=4), tmp_path / "s.pt")},
        ),
    }
    ids = {}
    for name, (model, spec, extra) in submissions.items():
        response = api.submit(model, spec, **extra)
        assert response.status_code == 202, response.text
        ids[name] = response.json()["id"]
    # The API host keeps nothing of an accepted job: its inputs are in the bucket.
    assert list((hosts.api.settings.data_dir / "jobs").iterdir()) == []
    assert f"{PREFIX}{ids['distill']}/input/student.pt" in hosts.objects()

    done = {name: api.wait(job_id, timeout=300) for name, job_id in ids.items()}
    served = {name: _verified(api, job) for name, job in done.items()}
    assert torch.jit.load(io.BytesIO(served["static"])).graph.findNode("quantized::conv2d") is not None
    keys = hosts.objects()
    for job in done.values():
        assert (
            f"{PREFIX}{job['id']}/model.attempt-1.pt" in keys and f"{PREFIX}{job['id']}/report.attempt-1.json" in keys
        )
    for worker in hosts.workers.values():  # each worker's staged copies went with the attempt
        work = worker.settings.data_dir / "work"
        assert not work.exists() or list(work.rglob("*.pt")) == []

    # With presigned downloads on, the API answers with a redirect to the same bytes, ETag unchanged.
    job = done["prune"]
    app = create_app(hosts.api.settings.with_changes(s3_presign_s=60))
    answer = app.test_client().get(f"/v1/jobs/{job['id']}/model", headers={"Accept-Encoding": "identity"})
    assert answer.status_code == 307 and answer.headers["ETag"] == f'"{job["result"]["sha256"]}"'
    fetched = api.session.get(answer.headers["Location"], timeout=30)
    assert fetched.status_code == 200 and fetched.content == served["prune"]

    # DELETE removes the job's objects.
    gone = done["dynamic"]["id"]
    assert api.session.delete(api.url(f"/v1/jobs/{gone}")).status_code == 204
    assert [key for key in hosts.objects() if gone in key] == []
    assert api.session.get(api.url(f"/v1/jobs/{gone}/model")).status_code == 404


def test_worker_killed_mid_job_is_taken_over_by_the_other_host(hosts: Hosts, tmp_path: Path) -> None:
    api = hosts.client
    job_id = api.submit(save_scripted(SlowModel(steps=2000), tmp_path / "slow.pt"), SLOW).json()["id"]
    api.wait(job_id, until={"running"}, timeout=120)
    child = compression_process(job_id)  # the job's process exists: it is really mid-run
    workspace = job_folder(child)  # its folder on its host: the job's workspace, or a pre-started one's
    victim = next(name for name, stack in hosts.workers.items() if workspace.startswith(str(stack.settings.data_dir)))
    survivor = next(name for name in hosts.workers if name != victim)

    hosts.workers[victim].kill_process("worker")  # the whole host's worker: Celery, supervisor, job process
    assert hosts.record(job_id)["state"] == "running" and hosts.record(job_id)["attempt"] == 1

    job = api.wait(job_id, timeout=240)
    assert job["deliveries"] == 2
    _verified(api, job)
    assert "attempt 2 completed" in _job_log(hosts.workers[survivor], job_id)  # the other host ran it
    assert f"{PREFIX}{job_id}/model.attempt-2.pt" in hosts.objects()
    assert f"{PREFIX}{job_id}/model.attempt-1.pt" not in hosts.objects()  # the killed attempt published nothing
    hosts.workers[victim].start_worker()


def test_worker_killed_mid_upload_leaves_nothing_a_client_sees(hosts: Hosts, tmp_path: Path) -> None:
    api = hosts.client
    folders = {name: arm(stack.settings.data_dir, "mid-publish") for name, stack in hosts.workers.items()}
    job_id = api.submit(
        save_scripted(SmallConvNet(), tmp_path / "conv.pt"),
        {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": EVALUATION},
    ).json()["id"]
    victim = _struck(folders, "mid-publish", job_id)
    for folder in folders.values():  # the other host must not pause when it takes over
        (folder / "mid-publish.armed").unlink(missing_ok=True)
    keys = hosts.objects()
    assert f"{PREFIX}{job_id}/model.attempt-1.pt" in keys and f"{PREFIX}{job_id}/report.attempt-1.json" not in keys
    assert api.job(job_id)["state"] == "running"
    assert api.session.get(api.url(f"/v1/jobs/{job_id}/model")).status_code == 409  # nothing served yet

    hosts.workers[victim].kill_process("worker")
    job = api.wait(job_id, timeout=240)

    assert job["deliveries"] == 2
    assert hashlib.sha256(_verified(api, job)).hexdigest() == job["result"]["sha256"]
    assert api.session.get(api.url(job["links"]["report"])).json()["deliveries"] == 2  # attempt 2's report
    hosts.workers[victim].start_worker()


def test_retention_empties_the_bucket(hosts: Hosts) -> None:
    assert hosts.objects()  # the jobs above left their files
    expiring = hosts.workers["a"].settings.with_changes(retention_hours=1e-9)
    _, expired = Reaper(expiring, make_celery(expiring)).sweep()
    # Four methods (one already deleted), the two taken over (one with attempt 1's stray model).
    assert len(expired) == 5
    assert hosts.objects() == []
    for job_id in expired:
        assert hosts.client.session.get(hosts.client.url(f"/v1/jobs/{job_id}")).status_code == 404


def _struck(folders: dict[str, Path], point: str, job_id: str, timeout: float = 120) -> str:
    """Which host's pause point struck for the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, folder in folders.items():
            if (folder / f"{point}.{job_id}").exists():
                return name
        time.sleep(0.05)
    raise AssertionError(f"pause point {point} not reached for job {job_id} within {timeout} s")


def _job_log(stack: Stack, job_id: str) -> str:
    return "\n".join(line for line in (stack.log_dir / "worker.log").read_text().splitlines() if job_id in line)


def test_submission_while_the_store_is_unreachable_is_a_503_and_leaves_nothing(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = make_settings(
        tmp_path / "api-host",
        redis_url="redis://127.0.0.1:1/0",
        storage_url=STORAGE_URL,
        s3_endpoint_url=closed,
        s3_access_key_id="k",
        s3_secret_access_key="s",
        s3_region="us-east-1",
    )
    client = create_app(settings).test_client()
    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    answer = client.post(
        "/v1/jobs",
        data={
            "spec": '{"method": "quantize", "input_shape": [1, 3, 8, 8]}',
            "model": (io.BytesIO(model.read_bytes()), "conv.pt"),
        },
    )
    assert answer.status_code == 503, answer.get_data(as_text=True)
    assert answer.mimetype == "application/problem+json" and "object store" in answer.get_json()["detail"]
    assert list((settings.data_dir / "jobs").iterdir()) == []  # the request's files were removed


class Ballast(torch.nn.Module):
    """A Linear layer the job quantizes and a float table of ``megabytes`` it keeps."""

    def __init__(self, megabytes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)
        self.table = torch.nn.Parameter(torch.randn(megabytes * (1 << 18)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.table[:64]


class RawSubmission:
    """A POST /v1/jobs sent by hand in pieces, so a test can look at the bucket while the body is
    still arriving, then finish the request or drop the connection."""

    def __init__(self, base_url: str, parts: list[tuple[str, bytes, str | None]], **headers: str) -> None:
        boundary = uuid.uuid4().hex
        self.body = (
            b"".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
                + (f'; filename="{filename}"\r\nContent-Type: application/octet-stream'.encode() if filename else b"")
                + b"\r\n\r\n"
                + content
                + b"\r\n"
                for name, content, filename in parts
            )
            + f"--{boundary}--\r\n".encode()
        )
        host, port = base_url.split("//")[1].split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)
        self.connection.putrequest("POST", "/v1/jobs")
        self.connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        self.connection.putheader("Content-Length", str(len(self.body)))
        for name, value in headers.items():
            self.connection.putheader(name.replace("_", "-"), value)
        self.connection.endheaders()
        self.sent = 0

    def send(self, upto: int) -> None:
        self.connection.send(self.body[self.sent : upto])
        self.sent = upto

    def finish(self) -> tuple[int, dict[str, Any]]:
        self.send(len(self.body))
        answer = self.connection.getresponse()
        return answer.status, json.loads(answer.read())


def _new_upload(hosts: Hosts, before: dict[str, str], timeout: float = 60) -> tuple[str, str]:
    """The multipart upload the request in progress started, once it has at least one part in the bucket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for upload_id, key in hosts.unfinished_uploads().items():
            if upload_id not in before and hosts.s3.client().list_parts(Bucket=BUCKET, Key=key, UploadId=upload_id).get(
                "Parts"
            ):
                return upload_id, key
        time.sleep(0.1)
    raise AssertionError(f"no multipart upload with a part appeared within {timeout} s")


@pytest.fixture(scope="module")
def ballast(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ballast") / "ballast.pt"
    torch.manual_seed(0)
    torch.jit.script(Ballast(12).eval()).save(str(path))
    return path.read_bytes()


BALLAST_SPEC = {"method": "quantize", "input_shape": [1, 64], "evaluation": EVALUATION}


def test_a_large_upload_streams_to_the_bucket_in_parts_while_it_arrives(hosts: Hosts, ballast: bytes) -> None:
    before = hosts.unfinished_uploads()
    request = RawSubmission(
        hosts.api.base_url, [("spec", json.dumps(BALLAST_SPEC).encode(), None), ("model", ballast, "ballast.pt")]
    )
    request.send(len(request.body) - (PART_MB << 20))  # a part in, two still to come
    upload_id, key = _new_upload(hosts, before)
    assert key.startswith(PREFIX) and key.endswith("/input/model.pt")
    status, job = request.finish()

    assert status == 202, job
    assert key == f"{PREFIX}{job['id']}/input/model.pt"  # the job's own input, under the id made as it streamed
    assert job["input"]["sha256"] == hashlib.sha256(ballast).hexdigest()
    assert upload_id not in hosts.unfinished_uploads()  # completed
    stored = hosts.s3.client().get_object(Bucket=BUCKET, Key=key)
    assert stored["ETag"].strip('"').endswith("-3")  # 12 MB in three parts of 5, 5 and 2 MB
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == job["input"]["sha256"]
    done = hosts.client.wait(job["id"], timeout=300)
    torch.jit.load(io.BytesIO(_verified(hosts.client, done)))
    assert hosts.client.session.delete(hosts.client.url(f"/v1/jobs/{job['id']}")).status_code == 204


@pytest.mark.parametrize(
    "after, refusal",
    [
        (("spec", json.dumps({"method": "shrink"}).encode()), (422, "spec.method")),  # refused by submit
        # Refused by the form parser (above Flask's 500 kB per field) before the view runs: only the
        # request's end aborts the streamed upload.
        (("callback_url", b"x" * 600_000), (413, None)),
    ],
    ids=["bad-spec", "oversized-field"],
)
def test_a_request_refused_after_its_model_streamed_leaves_nothing_in_the_bucket(
    hosts: Hosts, ballast: bytes, after: tuple[str, bytes], refusal: tuple[int, str | None]
) -> None:
    objects, before = set(hosts.objects()), hosts.unfinished_uploads()
    # The refused field comes after the model: it is read only once the model is in the store's parts.
    request = RawSubmission(
        hosts.api.base_url,
        [("model", ballast, "ballast.pt"), (*after, None), ("spec", json.dumps(BALLAST_SPEC).encode(), None)],
    )
    request.send(len(ballast) - (1 << 20))
    _upload_id, key = _new_upload(hosts, before)
    status, problem = request.finish()

    assert status == refusal[0], problem
    assert refusal[1] is None or refusal[1] in problem["errors"], problem
    assert hosts.unfinished_uploads() == before  # the streamed upload was aborted
    assert set(hosts.objects()) == objects
    assert hosts.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=key.rsplit("/input/", 1)[0]).get("KeyCount") == 0


def test_an_idempotent_replay_keeps_only_the_first_jobs_upload(hosts: Hosts, ballast: bytes) -> None:
    key = f"replay-{uuid.uuid4().hex}"
    parts = [("spec", json.dumps(BALLAST_SPEC).encode(), None), ("model", ballast, "ballast.pt")]
    status, first = RawSubmission(hosts.api.base_url, parts, Idempotency_Key=key).finish()
    assert status == 202, first
    before = hosts.unfinished_uploads()
    replay = RawSubmission(hosts.api.base_url, parts, Idempotency_Key=key)
    replay.send(len(replay.body) - (1 << 20))
    _, streamed = _new_upload(hosts, before)  # the replay's own upload, under a job id of its own
    status, job = replay.finish()

    assert status == 202 and job["id"] == first["id"], job
    assert streamed != f"{PREFIX}{first['id']}/input/model.pt"
    assert hosts.unfinished_uploads() == before  # the replay's upload was aborted
    assert not any(name.startswith(streamed.rsplit("/input/", 1)[0]) for name in hosts.objects())
    hosts.client.wait(first["id"], timeout=300)
    assert hosts.client.session.delete(hosts.client.url(f"/v1/jobs/{first['id']}")).status_code == 204


def test_a_client_that_disconnects_mid_upload_leaves_nothing_in_the_bucket(hosts: Hosts, ballast: bytes) -> None:
    objects, before = set(hosts.objects()), hosts.unfinished_uploads()
    request = RawSubmission(
        hosts.api.base_url, [("spec", json.dumps(BALLAST_SPEC).encode(), None), ("model", ballast, "ballast.pt")]
    )
    request.send(len(ballast) - (1 << 20))
    upload_id, _ = _new_upload(hosts, before)
    request.connection.close()  # a megabyte short of the Content-Length it announced

    deadline = time.monotonic() + 60
    while upload_id in hosts.unfinished_uploads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hosts.unfinished_uploads() == before
    assert set(hosts.objects()) == objects
    assert hosts.client.session.get(hosts.client.url("/healthz")).status_code == 200  # the API carries on


def test_readyz_checks_the_object_store(hosts: Hosts) -> None:
    reachable = create_app(hosts.api.settings).test_client().get("/readyz")
    assert reachable.status_code == 200, reachable.get_data(as_text=True)
    # The same API pointed at an endpoint where no store answers (Redis and the workers are still up).
    away = hosts.api.settings.with_changes(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    answer = create_app(away).test_client().get("/readyz")
    assert answer.status_code == 503
    assert f"object store s3://{BUCKET} does not answer" in answer.get_json()["detail"]


def test_files_the_store_did_not_remove_are_removed_by_a_later_sweep(
    hosts: Hosts, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = hosts.client.wait(
        hosts.client.submit(
            save_scripted(SmallConvNet(), tmp_path / "conv.pt"),
            {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": EVALUATION},
        ).json()["id"],
        timeout=120,
    )
    assert job["state"] == "succeeded", job["error"]
    expiring = hosts.workers["a"].settings.with_changes(retention_hours=1e-9)
    away = expiring.with_changes(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")  # no store answers there
    with caplog.at_level(logging.WARNING, logger="modelpress.objectstore"):
        _, expired = Reaper(away, make_celery(away)).sweep()

    assert expired == [job["id"]] and hosts.record(job["id"]) == {}  # the record went
    # The files could not, and the sweep said so. (The stacks' own reapers retry at once, so whether the
    # files are still in the bucket by now is a race: the log line is the fault's evidence.)
    assert f"job {job['id']}: files not removed" in caplog.text
    store = JobStore(redis.Redis.from_url(hosts.api.settings.redis_url))

    Reaper(expiring, make_celery(expiring)).sweep()  # the store is back
    assert [key for key in hosts.objects() if job["id"] in key] == []
    assert store.jobs_with_files_left() == []


def test_an_api_killed_mid_upload_leaves_files_that_a_later_sweep_removes(hosts: Hosts, ballast: bytes) -> None:
    objects, before = set(hosts.objects()), hosts.unfinished_uploads()
    store = JobStore(redis.Redis.from_url(hosts.api.settings.redis_url))
    uploads = hosts.api.settings.data_dir / "uploads"
    request = RawSubmission(
        hosts.api.base_url, [("spec", json.dumps(BALLAST_SPEC).encode(), None), ("model", ballast, "ballast.pt")]
    )
    request.send(len(request.body) - (PART_MB << 20))
    upload_id, key = _new_upload(hosts, before)  # mid-upload: a part is in the bucket, the rest still to come
    job_id = key[len(PREFIX) :].split("/", 1)[0]
    spools = [path for path in uploads.iterdir() if path.stat().st_size > 0]
    assert spools, "the request's spool file"
    hosts.api.kill_process("api")  # gunicorn and the worker serving the request, SIGKILL
    request.connection.close()

    assert upload_id in hosts.unfinished_uploads() and all(path.exists() for path in spools)  # the kill left them
    assert hosts.record(job_id) == {} and job_id in store.uploads_idle_since(math.inf)
    worker = hosts.workers["a"].settings
    Reaper(worker, make_celery(worker)).sweep()  # younger than MODELPRESS_ORPHAN_AFTER_S: it may still arrive
    assert upload_id in hosts.unfinished_uploads()

    aged = worker.with_changes(orphan_after_s=0)
    Reaper(aged, make_celery(aged)).sweep()
    assert upload_id not in hosts.unfinished_uploads() and hosts.unfinished_uploads() == before
    assert set(hosts.objects()) == objects
    assert job_id not in store.uploads_idle_since(math.inf)  # settled

    # The spool is the API host's own: the API removes it when it starts again, once it is that old.
    hosts.api.start_api()
    assert all(path.exists() for path in spools)
    create_app(hosts.api.settings.with_changes(orphan_after_s=0))
    assert not any(path.exists() for path in spools)
    assert hosts.client.session.get(hosts.client.url("/healthz")).status_code == 200


def test_a_staged_input_that_changed_in_the_store_is_refused(hosts: Hosts, tmp_path: Path) -> None:
    """Staged under a folder of its own: under worker b's, its reaper (rightly) removed the workspace of
    this job that no record names while it was being downloaded (seen once in the suite)."""
    from modelpress.jobs import new_job_id
    from modelpress.objectstore import InputsCorrupt
    from modelpress.s3_objects import S3Objects
    from modelpress.storage import Storage

    settings = hosts.workers["b"].settings
    objects = S3Objects(Storage(tmp_path / "staging"), settings)
    job_id = new_job_id()
    uploaded = b"the bytes the API hashed" * 1000
    client = hosts.s3.client()
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{job_id}/spec.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{job_id}/input/model.pt", Body=uploaded)
    digest = hashlib.sha256(uploaded).hexdigest()
    try:
        staged = objects.workspace(job_id, 1, {"input_model": digest})
        assert staged.input_model.read_bytes() == uploaded
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{job_id}/input/model.pt", Body=uploaded[:-1] + b"!")
        with pytest.raises(InputsCorrupt, match=digest):
            objects.workspace(job_id, 1, {"input_model": digest})
    finally:
        objects.release(job_id, 1)
        objects.delete(job_id)
    assert [key for key in hosts.objects() if job_id in key] == []


def test_uploads_past_the_processs_streaming_slots_spool_and_still_arrive_whole(hosts: Hosts) -> None:
    """An API process streams at most STREAMING_UPLOADS uploads at once (each may buffer 80 MB); the
    next one only spools and is sent from its spool, so many fast uploads cannot fill the API's memory."""
    from modelpress.jobs import new_job_id
    from modelpress.s3_objects import STREAMING_UPLOADS, S3Objects
    from modelpress.storage import Storage

    settings = hosts.api.settings
    objects = S3Objects(Storage(settings.data_dir), settings)
    body = (
        os.urandom(objects.stream_part_bytes) + b"tail"
    )  # over one part: a streaming upload starts a multipart upload
    streams = []

    def upload() -> Any:
        """One upload's file part arriving whole: spooled and handed to its stream writer."""
        job_id = new_job_id()
        spool = objects.storage.job(job_id).input_model
        spool.parent.mkdir(parents=True, exist_ok=True)
        spool.write_bytes(body)
        writer = objects.stream_writer(job_id, spool)
        writer.write(body)
        streams.append((job_id, writer))
        return writer

    try:
        started = [upload().upload_id is not None for _ in range(STREAMING_UPLOADS + 1)]
        assert started == [True] * STREAMING_UPLOADS + [False]  # the positive control streamed; the last did not
        for job_id, _ in streams:
            objects.keep_inputs(job_id)
            stored = hosts.s3.client().get_object(Bucket=BUCKET, Key=f"{PREFIX}{job_id}/input/model.pt")["Body"].read()
            assert stored == body
        # Completed uploads give their slots back: the next upload streams again.
        assert upload().upload_id is not None
        objects.keep_inputs(streams[-1][0])
    finally:
        for job_id, _ in streams:
            objects.drop_streams(job_id)
            objects.delete(job_id)
    assert not any(job_id in key for job_id, _ in streams for key in hosts.objects())
