"""A dying or cancelled compression process fails or cancels its own job only."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import ApiClient, compression_process, supervisor_process
from tests.models import SlowModel, SmallConvNet, save_scripted

# Many timed runs of a slow model: the job stays running until the test acts on it.
SLOW_SPEC = {"method": "quantize", "input_shape": [8, 64], "evaluation": {"runs": 1000, "warmup": 0}}
QUICK_SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 2, "warmup": 0}}


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_scripted(SlowModel(steps=5000), tmp_path_factory.mktemp("slow") / "slow.pt")


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_scripted(SmallConvNet(), tmp_path_factory.mktemp("quick") / "conv.pt")


def test_killed_compression_process_fails_its_job_and_the_worker_goes_on(
    api: ApiClient, slow_model: Path, quick_model: Path
) -> None:
    victim = api.submit(slow_model, SLOW_SPEC).json()["id"]
    api.wait(victim, until={"running"}, timeout=120)
    process = compression_process(victim)
    os.kill(process.pid, signal.SIGKILL)

    job = api.wait(victim, timeout=60)
    assert job["state"] == "failed"
    assert job["error"]["title"] == "Compression process died"
    assert "SIGKILL" in job["error"]["detail"]

    follower = api.wait(api.submit(quick_model, QUICK_SPEC).json()["id"], timeout=120)
    assert follower["state"] == "succeeded", follower["error"]


def test_cancelling_a_running_job_kills_its_process(api: ApiClient, slow_model: Path) -> None:
    job_id = api.submit(slow_model, SLOW_SPEC).json()["id"]
    api.wait(job_id, until={"running"}, timeout=120)
    process = compression_process(job_id)

    answer = api.session.delete(api.url(f"/v1/jobs/{job_id}"))
    assert answer.status_code == 202 and answer.json()["cancel_requested"] is True

    job = api.wait(job_id, timeout=60)
    assert job["state"] == "cancelled"
    process.wait(timeout=30)
    assert not process.is_running()
    # A finished job can then be deleted with its files.
    assert api.session.delete(api.url(f"/v1/jobs/{job_id}")).status_code == 204
    assert api.session.get(api.url(f"/v1/jobs/{job_id}")).status_code == 404


def test_cancelling_a_queued_job(api: ApiClient, slow_model: Path, quick_model: Path) -> None:
    blocker = api.submit(slow_model, SLOW_SPEC).json()["id"]  # occupies the only worker slot
    api.wait(blocker, until={"running"}, timeout=120)
    queued = api.submit(quick_model, QUICK_SPEC).json()["id"]

    answer = api.session.delete(api.url(f"/v1/jobs/{queued}"))
    assert answer.status_code == 202 and answer.json()["state"] == "cancelled"
    api.session.delete(api.url(f"/v1/jobs/{blocker}"))
    assert api.wait(blocker, timeout=60)["state"] == "cancelled"
    # Jobs are taken in order: once a later job has run, the worker has seen the cancelled one and skipped it.
    assert api.wait(api.submit(quick_model, QUICK_SPEC).json()["id"], timeout=120)["state"] == "succeeded"
    skipped = api.job(queued)
    assert skipped["state"] == "cancelled" and skipped["started_at"] is None


def _kill_pool_process(job_id: str) -> None:
    """SIGKILL the Celery pool process running the job (the parent of its compression process)."""
    child = compression_process(job_id)
    os.kill(supervisor_process(job_id).pid, signal.SIGKILL)
    child.wait(timeout=30)  # PR_SET_PDEATHSIG takes the compression process down with its supervisor


def test_job_whose_worker_dies_once_is_run_again_and_succeeds(api: ApiClient, tmp_path: Path) -> None:
    # About 10 s of latency runs: long enough to be found and killed mid-run on a fast, idle machine
    # (at 30 runs it once ended before the test found its process), short enough to run again after.
    model = save_scripted(SlowModel(steps=2000), tmp_path / "medium.pt")
    job_id = api.submit(model, {**SLOW_SPEC, "evaluation": {"runs": 250, "warmup": 0}}).json()["id"]
    api.wait(job_id, until={"running"}, timeout=120)

    _kill_pool_process(job_id)  # found by its compression process: the job was mid-run

    job = api.wait(job_id, timeout=300)
    assert job["state"] == "succeeded", job["error"]
    assert job["deliveries"] == 2  # taken over once
    served = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"})
    assert hashlib.sha256(served.content).hexdigest() == job["result"]["sha256"]


def test_job_that_keeps_killing_its_worker_fails_after_bounded_deliveries(
    api: ApiClient, stack, slow_model: Path
) -> None:
    job_id = api.submit(slow_model, SLOW_SPEC).json()["id"]
    limit = stack.settings.max_deliveries
    for _ in range(limit):
        api.wait(job_id, until={"running"}, timeout=120)
        _kill_pool_process(job_id)

    job = api.wait(job_id, timeout=120)
    assert job["state"] == "failed"
    assert job["error"]["title"] == "Worker lost"
    assert f"stopped {limit} times" in job["error"]["detail"]
    assert job["deliveries"] == limit + 1  # the delivery that found the limit spent took it, then failed it
