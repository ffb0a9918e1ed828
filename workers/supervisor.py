"""Supervise one job: claim it, run its compression in a fresh child process, record the outcome.

The child (``workers.job_process``) is a new interpreter per job, in its own process
group, so a segfault, an out-of-memory kill or a runaway model ends that job only.
Progress comes back as JSON lines on a pipe; the child never talks to Redis.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from modelpress import jobs
from modelpress.config import Settings
from modelpress.formats import TORCHSCRIPT
from modelpress.jobs import JobStore, utc_now
from modelpress.storage import JobFiles, Storage, read_json

log = logging.getLogger("modelpress.worker")

POLL_INTERVAL_S = 0.25
PROGRESS_WRITE_INTERVAL_S = 0.5  # progress and heartbeat
REDIS_RETRY_S = 300  # how long a final state waits for Redis to come back
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Supervisor:
    def __init__(self, settings: Settings, store: JobStore, storage: Storage) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage

    @classmethod
    @functools.lru_cache(maxsize=4)
    def from_settings(cls, settings: Settings) -> "Supervisor":
        client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        return cls(settings, JobStore(client), Storage(settings.data_dir))

    def run(self, job_id: str) -> tuple[str, bool]:
        """Run the job to a final state; return that state and whether this call moved the job there."""
        job = self.store.get(job_id)
        if job is None:
            log.warning("job %s: no record (deleted before it ran); skipping", job_id)
            return "missing", False
        if job["state"] in jobs.FINAL_STATES:
            return job["state"], False
        if job["state"] == jobs.RUNNING and not self._supervisor_gone(job_id):
            log.info("job %s: another worker is still running it; skipping this delivery", job_id)
            return jobs.RUNNING, False
        deliveries = self.store.count_delivery(job_id)
        if deliveries > self.settings.max_deliveries:
            return self._finish(job_id, jobs.FAILED, error=problem(
                "worker-lost", "Worker lost",
                f"the job's worker stopped {deliveries - 1} times while running it "
                f"(limit {self.settings.max_deliveries}); it is not retried again",
            ))
        if job["state"] == jobs.QUEUED:
            state = self.store.move(job_id, jobs.RUNNING, started_at=utc_now(), stage="starting", progress=0.0)
            if state != jobs.RUNNING:
                return state or "missing", False
        else:
            log.warning("job %s: delivery %d after its worker stopped; running it again", job_id, deliveries)
            self.store.beat(job_id)
            self.store.update_running(job_id, stage="restarting", progress=0.0)
        log.info("job %s: running (delivery %d)", job_id, deliveries)
        return self._run_child(job_id, self.storage.job(job_id))

    def _supervisor_gone(self, job_id: str) -> bool:
        """Wait until the job's heartbeat is stale (its supervisor died) or it leaves ``running``.

        A job redelivered while ``running`` may still have a live supervisor (a requeue raced a
        slow heartbeat); taking it over then would run it twice.
        """
        deadline = time.monotonic() + self.settings.heartbeat_stale_s + 5
        while time.monotonic() < deadline:
            last = self.store.last_beat(job_id)
            if last is None:
                return False  # no longer running
            if time.time() - last >= self.settings.heartbeat_stale_s:
                return True
            time.sleep(1.0)
        return False

    # ------------------------------------------------------------------ the child process

    def _run_child(self, job_id: str, files: JobFiles) -> tuple[str, bool]:
        read_fd, write_fd = os.pipe()
        with open(files.process_log, "ab") as log_file:
            child = subprocess.Popen(
                [sys.executable, "-m", "workers.job_process", str(files.root)],
                cwd=files.root,
                env=self._child_env(write_fd),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=[write_fd],
                start_new_session=True,  # its own process group, killed as a whole
            )
        os.close(write_fd)
        messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=_read_messages, args=(read_fd, messages), daemon=True).start()
        self._quietly(self.store.update_running, job_id, process_pid=child.pid)

        deadline = time.monotonic() + self.settings.job_timeout_s
        outcome: dict[str, Any] | None = None
        last_progress: dict[str, Any] | None = None
        last_write = 0.0
        stop_reason: str | None = None
        while True:
            try:
                message = messages.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                message = {}
            if message is None:  # pipe closed: the child has exited or is exiting
                child.wait()
                break
            if message.get("event") == "progress":
                last_progress = message
            elif message.get("event") in ("succeeded", "failed"):
                outcome = message
            now = time.monotonic()
            if now - last_write >= PROGRESS_WRITE_INTERVAL_S:
                # Redis may be restarting: the child goes on, progress is written once it is back.
                if self._quietly(lambda: self.store.beat(job_id) or True, default=False) and last_progress:
                    self._quietly(self.store.update_running, job_id, stage=last_progress["stage"],
                                  progress=last_progress["progress"])
                    last_progress = None
                last_write = now
                if self._quietly(self.store.cancel_wanted, job_id, default=False):
                    stop_reason = "cancelled"
            if not stop_reason and now > deadline:
                stop_reason = "timeout"
            if stop_reason:
                _kill_group(child)
                break

        if stop_reason == "cancelled":
            return self._finish(job_id, jobs.CANCELLED)
        if stop_reason == "timeout":
            return self._finish(job_id, jobs.FAILED, error=problem(
                "job-timeout", "Time limit exceeded",
                f"the compression did not finish within the job time limit of {self.settings.job_timeout_s} s "
                "and was stopped",
            ))
        return self._record_exit(job_id, files, child.returncode, outcome)

    def _record_exit(self, job_id: str, files: JobFiles, returncode: int,
                     outcome: dict[str, Any] | None) -> tuple[str, bool]:
        if returncode == 0 and outcome and outcome["event"] == "succeeded" and files.output_model.exists():
            report = read_json(files.report)
            return self._finish(job_id, jobs.SUCCEEDED, result=_result_summary(files, report), progress=1.0, stage="done")
        if outcome and outcome["event"] == "failed":
            return self._finish(job_id, jobs.FAILED, error=problem(outcome["slug"], outcome["title"], outcome["detail"]))
        return self._finish(job_id, jobs.FAILED, error=_died(returncode, self.settings))

    def _child_env(self, progress_fd: int) -> dict[str, str]:
        """A scrubbed environment: no Redis URL, keys or other secrets reach the model's process."""
        threads = str(self.settings.job_threads)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(PROJECT_ROOT),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
            "MODELPRESS_JOB_THREADS": threads,
            "MODELPRESS_JOB_MEMORY_MB": str(self.settings.job_memory_mb),
            "MODELPRESS_JOB_TIMEOUT_S": str(self.settings.job_timeout_s),
            "MODELPRESS_PROGRESS_FD": str(progress_fd),
        }
        for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # keep this machine's OpenBLAS workarounds
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    def _finish(self, job_id: str, state: str, **fields: Any) -> tuple[str, bool]:
        """Record the final state, retrying while Redis is unreachable (a restart must not lose it)."""
        deadline = time.monotonic() + REDIS_RETRY_S
        while True:
            try:
                final = self.store.move(job_id, state, finished_at=utc_now(), **fields)
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        return final or "missing", final == state

    @staticmethod
    def _quietly(call, *args: Any, default: Any = None, **kwargs: Any) -> Any:
        """``call``, or ``default`` while Redis is unreachable."""
        try:
            return call(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            log.warning("Redis unreachable (%s); the job goes on", error)
            return default


def problem(slug: str, title: str, detail: str) -> dict[str, Any]:
    """A failed job's ``error``: the same shape as the API's problem+json bodies."""
    return {"type": f"https://modelpress.dev/problems/{slug}", "title": title, "status": 422, "detail": detail}


def _died(returncode: int, settings: Settings) -> dict[str, Any]:
    if returncode < 0:
        signum = -returncode
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
        if signum == signal.SIGSEGV:
            why = "it crashed with a segmentation fault (a native crash inside torch on this model)"
        elif signum == signal.SIGKILL:
            why = (f"it was killed with SIGKILL (out of memory under the {settings.job_memory_mb} MB limit, "
                   "or stopped by an operator)")
        else:
            why = f"it was stopped by {name}"
        detail = f"the compression process died: {why}"
    else:
        detail = f"the compression process exited with status {returncode} without reporting a result"
    return problem("process-died", "Compression process died", detail)


def _result_summary(files: JobFiles, report: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(files.output_model, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "bytes": files.output_model.stat().st_size,
        "sha256": digest.hexdigest(),
        "format": report.get("format", {}).get("output", TORCHSCRIPT),
        "size_ratio": report["size"]["ratio"],
        "latency_ratio": report["latency"]["ratio"],
        "cosine_similarity": report["fidelity"]["cosine_similarity"],
        "top1_agreement": report["fidelity"]["top1_agreement"],
    }


def _read_messages(read_fd: int, messages: "queue.Queue[dict[str, Any] | None]") -> None:
    with os.fdopen(read_fd, "r", errors="replace") as pipe:
        for line in pipe:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                messages.put(message)
    messages.put(None)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
