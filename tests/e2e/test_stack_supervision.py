"""`make run` heals itself: SIGKILL any one of its children and the service answers again within
30 s and finishes every job it had."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from modelpress.stack import PROJECT_ROOT, free_port
from tests.models import SlowModel, save_scripted

MEDIUM = {"method": "quantize", "input_shape": [8, 64], "evaluation": {"runs": 10, "warmup": 0}}
ROLES = {"worker": "celery", "redis": "redis-server", "api": "gunicorn"}


def _child(stack: subprocess.Popen, role: str, not_pid: int | None = None, timeout: float = 30) -> psutil.Process:
    """The stack's child in ``role`` (other than ``not_pid``), waiting up to ``timeout`` seconds for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(stack.pid).children():
            try:
                if ROLES[role] in " ".join(child.cmdline()) and child.pid != not_pid:
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no {role} child of the stack")


def _answers(base: str, job_ids: list[str]) -> bool:
    """The API is up and reads every job's record from Redis."""
    try:
        return requests.get(base + "/healthz", timeout=2).status_code == 200 and all(
            requests.get(f"{base}/v1/jobs/{job_id}", timeout=2).status_code == 200 for job_id in job_ids
        )
    except requests.RequestException:
        return False


@pytest.mark.parametrize("role", ["worker", "redis", "api"])
def test_sigkilled_child_is_restarted_and_every_job_finishes(role: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MODELPRESS_DATA_DIR": str(tmp_path / "data"),
        "MODELPRESS_PORT": str(port),
        "MODELPRESS_REDIS_PORT": str(free_port()),
        "MODELPRESS_HEARTBEAT_STALE_S": "6",
        "MODELPRESS_LOG_FORMAT": "json",
        "MODELPRESS_MAX_UPLOAD_MB": "64",
        "MODELPRESS_JOB_THREADS": "1",
    }
    env.pop("REDIS_URL", None)
    env.pop("MODELPRESS_TEST_PAUSE", None)
    log_path = tmp_path / "stack.log"
    with open(log_path, "wb") as log_file:
        stack = subprocess.Popen(
            [sys.executable, "-m", "modelpress.stack"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _answers(base, []):
            assert stack.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        model = save_scripted(SlowModel(steps=2000), tmp_path / "medium.pt").read_bytes()
        job_ids = [
            requests.post(
                base + "/v1/jobs", files={"model": ("m.pt", model)}, data={"spec": json.dumps(MEDIUM)}, timeout=60
            ).json()["id"]
            for _ in range(2)
        ]
        deadline = time.monotonic() + 120
        while requests.get(f"{base}/v1/jobs/{job_ids[0]}", timeout=5).json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert requests.get(f"{base}/v1/jobs/{job_ids[1]}", timeout=5).json()["state"] == "queued"

        victim = _child(stack, role)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        assert not victim.is_running()

        deadline = time.monotonic() + 30  # the service answers again within 30 s
        while not _answers(base, job_ids):
            assert time.monotonic() < deadline, f"no answer 30 s after the {role} was killed"
            time.sleep(0.25)
        _child(stack, role, not_pid=victim.pid)  # a new one, started by the stack
        for job_id in job_ids:
            deadline = time.monotonic() + 300
            while (job := requests.get(f"{base}/v1/jobs/{job_id}", timeout=5).json())["state"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job["state"] == "succeeded", job["error"]
            if role == "worker" and job_id == job_ids[0]:  # the running job was struck: taken again by the new worker
                assert job["deliveries"] == 2, job
            served = requests.get(f"{base}/v1/jobs/{job_id}/model", headers={"Accept-Encoding": "identity"}, timeout=30)
            assert hashlib.sha256(served.content).hexdigest() == job["result"]["sha256"]
        assert stack.poll() is None  # still up
        # The stack logs "restarted" once its own readiness check passes, which may be after the new
        # child already answered the requests above.
        deadline = time.monotonic() + 30
        while not (f"{role} exited" in (text := log_path.read_text()) and f"{role} restarted" in text):
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.2)
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            assert stack.wait(timeout=60) == 0
        finally:
            if stack.poll() is None:
                os.killpg(stack.pid, signal.SIGKILL)


def test_a_child_in_a_crash_loop_stops_the_service_with_an_error_naming_it(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MODELPRESS_DATA_DIR": str(tmp_path / "data"),
        "MODELPRESS_PORT": str(port),
        "MODELPRESS_REDIS_PORT": str(free_port()),
        "MODELPRESS_LOG_FORMAT": "json",
    }
    env.pop("REDIS_URL", None)
    log_path = tmp_path / "stack.log"
    with open(log_path, "wb") as log_file:
        stack = subprocess.Popen(
            [sys.executable, "-m", "modelpress.stack"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"http://127.0.0.1:{port}", []):
            assert stack.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        killed = None
        deadline = time.monotonic() + 120
        while stack.poll() is None:  # kill every worker the stack starts, as soon as it appears
            assert time.monotonic() < deadline, "the stack kept restarting a crash-looping worker"
            try:
                victim = _child(stack, "worker", not_pid=killed, timeout=40)
            except (AssertionError, psutil.NoSuchProcess):
                continue  # the stack is giving up
            victim.send_signal(signal.SIGKILL)
            killed = victim.pid
        assert stack.returncode == 1
        assert "worker exited with status -9 (crash 5 within 30 s); giving up" in log_path.read_text()
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
