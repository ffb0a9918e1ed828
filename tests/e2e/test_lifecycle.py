"""Faults struck at the bad moments of a job's life; each test first proves the fault struck where
it meant to (a pause point, a stopped process, a record read from Redis), then checks the outcome:
one final state, the expected ``deliveries``, the served file's digest equal to the recorded one,
one 2xx webhook per ``webhook-id``, and the tenant's quota back to zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from modelpress.fault_injection import arm
from modelpress.jobs import JobStore
from modelpress.stack import Stack
from tests.conftest import ApiClient, compression_process, job_children, make_settings, supervisor_process
from tests.models import SlowModel, SmallConvNet, save_scripted
from tests.webhooks import WebhookReceiver

QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 2, "warmup": 0}}
# A few seconds of timed runs of a slow model: long enough to strike while it runs.
MEDIUM = {"method": "quantize", "input_shape": [8, 64], "evaluation": {"runs": 20, "warmup": 0}}
PAUSES = "after-record:60,before-claim:raise"


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("lifecycle")
    previous = os.environ.get("MODELPRESS_TEST_PAUSE")
    os.environ["MODELPRESS_TEST_PAUSE"] = PAUSES  # inherited by the stack's children only
    running = Stack(
        make_settings(root / "data", redis_url=None, heartbeat_stale_s=8, job_threads=1), log_dir=root / "logs"
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()
        if previous is None:
            os.environ.pop("MODELPRESS_TEST_PAUSE", None)
        else:
            os.environ["MODELPRESS_TEST_PAUSE"] = previous


@pytest.fixture(scope="module")
def api(life: Stack) -> ApiClient:
    return ApiClient(life.base_url)


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_scripted(SmallConvNet(), tmp_path_factory.mktemp("quick") / "conv.pt")


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_scripted(SlowModel(steps=2000), tmp_path_factory.mktemp("medium") / "medium.pt")


def _redis(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.settings.redis_url, socket_timeout=5)


def _record(stack: Stack, job_id: str) -> dict[str, Any]:
    return JobStore(_redis(stack)).get(job_id) or {}


def _struck(folder: Path, point: str, timeout: float = 60) -> str:
    """The job id at which the armed pause point struck."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for marker in folder.glob(f"{point}.*"):
            if marker.suffix != ".armed":
                return marker.name.split(".", 1)[1]
        time.sleep(0.05)
    raise AssertionError(f"pause point {point} not reached within {timeout} s")


def _check_outcome(
    api: ApiClient, stack: Stack, job_id: str, deliveries: int, timeout: float = 240, last: bool = True
) -> dict[str, Any]:
    job = api.wait(job_id, timeout=timeout)
    assert job["state"] == "succeeded", job["error"]
    assert job["deliveries"] == deliveries
    served = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"})
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == job["result"]["sha256"]
    assert api.session.get(api.url(job["links"]["report"])).json()["deliveries"] == deliveries
    if last:
        assert _redis(stack).scard("modelpress:tenant:public:active") == 0  # quota back to zero
    return job


def _wait_running(api: ApiClient, job_id: str) -> None:
    api.wait(job_id, until={"running"}, timeout=120)
    compression_process(job_id)  # the child exists: the job is really mid-run


# ----------------------------------------------------------------------------- lost messages


def test_api_killed_between_record_and_enqueue(life: Stack, api: ApiClient, quick_model: Path) -> None:
    folder = arm(life.settings.data_dir, "after-record")
    threading.Thread(target=lambda: _quietly_submit(api, quick_model), daemon=True).start()
    job_id = _struck(folder, "after-record")
    record = _record(life, job_id)
    assert record["state"] == "queued" and record["gen"] == 1
    assert job_id.encode() not in b"".join(_redis(life).lrange("modelpress", 0, -1))  # no message sent

    life.kill_process("api")
    life.start_api()

    job = _check_outcome(api, life, job_id, deliveries=1)
    assert _record(life, job_id)["gen"] == 2  # re-sent exactly once by the reconciler
    assert job["id"] == job_id


def test_supervisor_raising_before_it_takes_the_job_does_not_leave_it_queued(
    life: Stack, api: ApiClient, quick_model: Path
) -> None:
    folder = arm(life.settings.data_dir, "before-claim")
    job_id = api.submit(quick_model, QUICK).json()["id"]
    assert _struck(folder, "before-claim") == job_id
    assert _record(life, job_id)["deliveries"] == 0  # raised before taking it; Celery acked the message

    _check_outcome(api, life, job_id, deliveries=1)
    assert _record(life, job_id)["gen"] == 2


# ----------------------------------------------------------------------------- dead processes


def test_worker_sigkilled_mid_job(life: Stack, api: ApiClient, medium_model: Path) -> None:
    job_id = api.submit(medium_model, MEDIUM).json()["id"]
    _wait_running(api, job_id)

    life.kill_process("worker")  # the whole Celery worker: main process, pool and the job's child
    assert _record(life, job_id)["state"] == "running"
    life.start_worker()

    _check_outcome(api, life, job_id, deliveries=2)


def test_redis_sigkilled_with_jobs_queued_and_running(
    life: Stack, api: ApiClient, medium_model: Path, quick_model: Path
) -> None:
    # 25 times MEDIUM's timed runs: with its process pre-started (no 3 s start-up) MEDIUM alone could end
    # within the 1.5 s below, and the queued job would be running already (100 runs did, on a fast hour).
    running = api.submit(medium_model, {**MEDIUM, "evaluation": {"runs": 500, "warmup": 0}}).json()["id"]
    _wait_running(api, running)
    queued = api.submit(quick_model, QUICK).json()["id"]
    time.sleep(1.5)  # past appendfsync everysec: both records are on disk
    assert api.job(queued)["state"] == "queued" and api.job(running)["state"] == "running"

    life.kill_process("redis")
    life.start_redis()

    # The running job's supervisor reconnects within the grace Redis's restart gives it: not run twice.
    _check_outcome(api, life, running, deliveries=1, last=False)
    _check_outcome(api, life, queued, deliveries=1)


def test_redis_outage_longer_than_the_job_and_the_stale_period(life: Stack, api: ApiClient, medium_model: Path) -> None:
    job_id = api.submit(medium_model, MEDIUM).json()["id"]
    _wait_running(api, job_id)
    child = compression_process(job_id)

    life.kill_process("redis")
    child.wait(timeout=120)  # the compression finished while Redis was away
    time.sleep(2 * life.settings.heartbeat_stale_s + 1)  # and the outage lasts over two stale periods more
    life.start_redis()

    _check_outcome(api, life, job_id, deliveries=1)  # recorded when Redis came back, not run again


def test_two_workers_racing_for_a_stale_job_and_the_superseded_supervisor_writes_nothing(
    life: Stack, api: ApiClient, medium_model: Path
) -> None:
    job_id = api.submit(medium_model, MEDIUM).json()["id"]
    _wait_running(api, job_id)
    supervisor = supervisor_process(job_id)
    supervisor.suspend()  # a supervisor cut off (as by a partition): no beats, its child goes on
    try:
        store = JobStore(_redis(life))
        deadline = time.monotonic() + 60
        while (
            time.time() - (store.redis.zscore("modelpress:running", job_id) or 0) < life.settings.heartbeat_stale_s + 1
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # Two deliveries race for the stale job through the same atomic claim the workers use.
        results: list[Any] = []
        barrier = threading.Barrier(8)

        def race() -> None:
            contender = JobStore(_redis(life))
            barrier.wait()
            results.append(contender.claim(job_id, None, life.settings.heartbeat_stale_s))

        threads = [threading.Thread(target=race) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(claim.outcome for claim in results) == ["busy"] * 7 + ["claimed"]
        winner = next(claim for claim in results if claim.outcome == "claimed")
        assert winner.deliveries == 2
    finally:
        supervisor.resume()
    # The old supervisor (attempt 1) is refused on its next beat and stops its child; it records nothing.
    deadline = time.monotonic() + 60
    while job_children(supervisor) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not job_children(supervisor)  # (the next job's pre-started process may be there already)
    time.sleep(2)
    record = _record(life, job_id)
    assert record["state"] == "running" and record["attempt"] == winner.attempt and record["result"] is None
    # The winner's delivery is gone with this test's thread: its heartbeat goes stale, the reconciler
    # re-sends, and the next worker takes over (delivery 3) and finishes the job once.
    _check_outcome(api, life, job_id, deliveries=3)


# ----------------------------------------------------------------------------- webhooks


def test_webhook_receiver_down_across_a_worker_crash(life: Stack, api: ApiClient, quick_model: Path) -> None:
    with WebhookReceiver(answer=lambda tries: 503) as receiver:  # down until the worker crashed
        job = api.session.post(
            api.url("/v1/jobs"),
            files={"model": ("m.pt", quick_model.read_bytes())},
            data={"spec": json.dumps(QUICK), "callback_url": receiver.url},
        ).json()
        assert api.wait(job["id"])["state"] == "succeeded"
        deadline = time.monotonic() + 60
        while not receiver.tries and time.monotonic() < deadline:
            time.sleep(0.1)
        assert receiver.tries and receiver.tries[0].status == 503  # the receiver was down when the job ended

        life.kill_process("worker")  # the dispatcher dies with its worker, the event stays in the outbox
        assert _redis(life).zcard("modelpress:outbox") == 1
        receiver.answer = lambda tries: 200
        life.start_worker()

        deadline = time.monotonic() + 120
        while not receiver.accepted() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        assert {one.webhook_id for one in receiver.tries} == {f"msg_{job['id']}_succeeded"}  # same id every try
        assert receiver.accepted() == {f"msg_{job['id']}_succeeded": 1}
        assert json.loads(receiver.tries[-1].body)["data"]["state"] == "succeeded"
        assert _redis(life).zcard("modelpress:outbox") == 0


def _quietly_submit(api: ApiClient, model: Path) -> None:
    try:
        api.submit(model, QUICK)
    except requests.RequestException:
        pass  # the API is killed while this request waits at its pause point
