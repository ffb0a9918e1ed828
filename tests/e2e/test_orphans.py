"""Files that no job needs but nothing else would remove: an API process killed mid-request leaves
them (the upload is noted in Redis as it begins, never recorded nor rolled back); the reaper removes
them once older than ``MODELPRESS_ORPHAN_AFTER_S``, and touches nothing the API did not note.

The object-store layout (unfinished multipart uploads in the bucket) is in test_object_storage.py.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import requests

from modelpress.fault_injection import arm
from modelpress.jobs import JobStore, connect, new_job_id
from modelpress.stack import Stack
from service import create_app
from tests.conftest import ApiClient, make_settings
from tests.models import SmallConvNet, save_scripted
from workers.celery_app import make_celery
from workers.reaper import Reaper

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}


def test_an_api_killed_before_the_record_leaves_files_that_a_later_sweep_removes(tmp_path: Path) -> None:
    os.environ["MODELPRESS_TEST_PAUSE"] = "before-record:120"  # inherited by the API's processes
    try:
        stack = Stack(make_settings(tmp_path / "data", redis_url=None), log_dir=tmp_path / "logs").start(worker=False)
    finally:
        del os.environ["MODELPRESS_TEST_PAUSE"]
    try:
        settings = stack.settings
        store = JobStore(connect(settings.redis_url))
        jobs_dir = settings.data_dir / "jobs"
        unnoted = jobs_dir / new_job_id(time.time() - 7200)  # a folder no request of this API noted
        unnoted.mkdir(parents=True)
        pauses = arm(settings.data_dir, "before-record")
        model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
        posting = threading.Thread(target=_post_ignoring_the_kill, args=(stack.base_url, model), daemon=True)
        posting.start()
        deadline = time.monotonic() + 60
        while not _struck(pauses) and time.monotonic() < deadline:
            time.sleep(0.05)
        struck = _struck(pauses)
        assert struck, "the request did not reach the moment between keeping its files and recording the job"
        job_id = struck[0].name.split(".", 1)[1]
        assert (jobs_dir / job_id / "input" / "model.pt").exists() and store.get(job_id) is None
        stack.kill_process("api")
        posting.join(30)

        assert job_id in store.uploads_idle_since(math.inf)  # noted, never settled
        Reaper(settings, make_celery(settings)).sweep()  # younger than the bound: the request might still be alive
        assert (jobs_dir / job_id / "input" / "model.pt").exists()

        aged = settings.with_changes(orphan_after_s=0)
        Reaper(aged, make_celery(aged)).sweep()
        assert not (jobs_dir / job_id).exists()
        assert job_id not in store.uploads_idle_since(math.inf)
        assert unnoted.exists()  # nothing the API did not note is touched (an emptied Redis deletes nothing)
    finally:
        stack.stop()


def test_spool_files_of_killed_requests_go_when_the_api_starts_once_they_are_old(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", redis_url="redis://127.0.0.1:1/0")  # no Redis needed for this
    create_app(settings)
    uploads = settings.data_dir / "uploads"
    old, fresh = uploads / "upload-killed-long-ago", uploads / "upload-still-arriving"
    for path in (old, fresh):
        path.write_bytes(b"part of a model")
    os.utime(old, (time.time() - 2 * settings.orphan_after_s,) * 2)
    create_app(settings)
    assert not old.exists() and fresh.exists()


def test_request_folders_an_api_host_keeps_in_s3_mode_go_once_not_written_for_long(tmp_path: Path) -> None:
    # In S3 mode a job's folder on the API host lives only while its request runs (keep_inputs removes it).
    settings = make_settings(
        tmp_path / "api-host",
        redis_url="redis://127.0.0.1:1/0",
        storage_url="s3://bucket/p",
        s3_endpoint_url="http://127.0.0.1:1",
        s3_access_key_id="k",
        s3_secret_access_key="s",
        s3_region="us-east-1",
    )
    jobs_dir = settings.data_dir / "jobs"
    killed, arriving = jobs_dir / new_job_id(time.time() - 7200), jobs_dir / new_job_id(time.time() - 7200)
    for folder in (killed, arriving):
        (folder / "input").mkdir(parents=True)
        (folder / "input" / "model.pt").write_bytes(b"a model")
    os.utime(killed, (time.time() - 2 * settings.orphan_after_s,) * 2)  # its request last wrote long ago
    create_app(settings)
    # The id of the other is as old, but its request is still writing: a slow upload is not an orphan.
    assert not killed.exists() and (arriving / "input" / "model.pt").exists()


def _post_ignoring_the_kill(base_url: str, model: Path) -> None:
    try:
        requests.post(
            f"{base_url}/v1/jobs",
            files={"model": ("conv.pt", model.read_bytes())},
            data={"spec": json.dumps(SPEC)},
            timeout=120,
        )
    except requests.RequestException:
        pass  # the API was killed under it


def _struck(pauses: Path) -> list[Path]:
    return [path for path in pauses.glob("before-record.*") if path.suffix != ".armed"]


def test_slow_uploads_on_every_api_process_do_not_hold_the_api(api: ApiClient, stack: Stack, tmp_path: Path) -> None:
    from tests.e2e.test_object_storage import RawSubmission

    job = api.wait(api.submit(save_scripted(SmallConvNet(), tmp_path / "conv.pt"), SPEC).json()["id"], timeout=120)
    model = os.urandom(2 << 20)  # never completed, so never checked: only its first megabyte is sent
    slow = [
        RawSubmission(stack.base_url, [("spec", json.dumps(SPEC).encode(), None), ("model", model, "conv.pt")])
        for _ in range(stack.settings.api_workers)
    ]
    try:
        for request in slow:
            request.send(len(request.body) // 2)  # and then nothing: a client on a stalled link
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_requests_in_flight(stack)) < len(slow):
            time.sleep(0.1)
        assert len(_requests_in_flight(stack)) >= len(slow), "every API process is reading a slow upload"
        assert requests.get(f"{stack.base_url}/healthz", timeout=10).status_code == 200
        assert api.session.get(api.url(f"/v1/jobs/{job['id']}"), timeout=10).json()["state"] == "succeeded"
    finally:
        for request in slow:
            request.connection.close()


def _requests_in_flight(stack: Stack) -> list[Path]:
    """The spool files of uploads being read (one per slow request, in the stack's data directory)."""
    return [path for path in (stack.settings.data_dir / "uploads").iterdir() if path.stat().st_size > 0]
