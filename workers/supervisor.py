"""Supervise one job: claim it, run its compression in a fresh child process, record the outcome.

The child (``workers.job_process``) is a new interpreter per job, in its own process
group, so a segfault, an out-of-memory kill or a runaway model ends that job only.
Progress comes back as JSON lines on a pipe; the child never talks to Redis.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import redis

from modelpress import jobs
from modelpress.config import Settings
from modelpress.faults import pause_point
from modelpress.formats import TORCHSCRIPT
from modelpress.jobs import JobStore, Superseded, connect, utc_now
from modelpress.objectstore import InputsCorrupt, InputsMissing, ObjectStore, file_sha256, open_object_store
from modelpress.storage import JobFiles, Storage, read_json
from workers import job_protocol as protocol
from workers import sandbox
from workers.job_protocol import problem
from workers.memory import MemoryWatch

log = logging.getLogger("modelpress.worker")

POLL_INTERVAL_S = 0.25
PROGRESS_WRITE_INTERVAL_S = 0.5  # progress and heartbeat
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Supervisor:
    def __init__(self, settings: Settings, store: JobStore, storage: Storage, objects: ObjectStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.objects = objects or open_object_store(settings, storage)

    @classmethod
    @functools.lru_cache(maxsize=4)
    def from_settings(cls, settings: Settings) -> "Supervisor":
        return cls(settings, JobStore(connect(settings.redis_url)), Storage(settings.data_dir))

    def run(self, job_id: str, generation: int | None = None) -> tuple[str, bool]:
        """Run the job to a final state; return that state and whether this call moved the job there.

        ``generation`` is the message's enqueue generation: a message superseded by a re-send
        is dropped. The claim is one atomic step; from then on every write carries its attempt.
        """
        pause_point("before-claim", job_id)
        claim = self.store.claim(job_id, generation, self.settings.heartbeat_stale_s)
        if claim.outcome != "claimed":
            log.info("job %s: delivery skipped (%s, job %s)", job_id, claim.outcome, claim.state,
                     extra={"job_id": job_id})
            return claim.state or "missing", False
        if claim.deliveries > self.settings.max_deliveries:
            return self._finish(job_id, claim.attempt, jobs.FAILED, error=problem(
                "worker-lost", "Worker lost",
                f"the job's worker stopped {claim.deliveries - 1} times while running it "
                f"(limit {self.settings.max_deliveries}); it is not retried again",
            ))
        if claim.deliveries > 1:
            log.warning("job %s: delivery %d after its worker stopped; running it again", job_id, claim.deliveries)
        log.info("job %s: running (delivery %d)", job_id, claim.deliveries)
        try:
            with self._beating(job_id, claim.attempt):  # with S3: inputs staged into a private directory
                files = self.objects.workspace(job_id, claim.attempt, _input_digests(self.store.get(job_id) or {}))
        except InputsMissing as missing:
            return self._finish(job_id, claim.attempt, jobs.FAILED, error=problem(
                "inputs-missing", "Inputs missing", f"the job's uploaded files are gone from the object store ({missing})"))
        except InputsCorrupt as corrupt:
            return self._finish(job_id, claim.attempt, jobs.FAILED, error=problem(
                "inputs-corrupt", "Inputs corrupt", f"the job's uploaded files changed in the object store: {corrupt}; "
                                                    "submit the job again"))
        try:
            return self._run_child(job_id, claim.attempt, claim.deliveries, files)
        finally:
            self.objects.release(job_id, claim.attempt)

    # ------------------------------------------------------------------ the child process

    def _run_child(self, job_id: str, attempt: int, deliveries: int, files: JobFiles) -> tuple[str, bool]:
        read_fd, write_fd = os.pipe()
        with open(files.process_log, "ab") as log_file:
            try:
                child = self._start_child(files, log_file, write_fd)
            except OSError as error:  # bubblewrap (or Python) is missing: no unconfined fallback
                os.close(write_fd)
                os.close(read_fd)
                return self._finish(job_id, attempt, jobs.FAILED, error=protocol.sandbox_unavailable(
                    f"{self.settings.bwrap} could not be started ({error.strerror or error})"))
        os.close(write_fd)
        memory = MemoryWatch(child.pid, self.settings.job_memory_mb << 20, functools.partial(_signal_group, child)).start()
        try:
            return self._watch_child(job_id, attempt, deliveries, files, child, read_fd, memory)
        finally:
            memory.stop()

    def _watch_child(self, job_id: str, attempt: int, deliveries: int, files: JobFiles, child: subprocess.Popen,
                     read_fd: int, memory: MemoryWatch) -> tuple[str, bool]:
        messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=protocol.read_messages, args=(read_fd, messages), daemon=True).start()
        stop_reason: str | None = None
        try:
            self._quietly(self.store.beat, job_id, attempt, process_pid=child.pid)
        except Superseded:
            stop_reason = "superseded"

        deadline = time.monotonic() + self.settings.job_timeout_s
        outcome: dict[str, Any] | None = None
        last_progress: dict[str, Any] | None = None
        started = False
        last_write = 0.0
        while not stop_reason:
            try:
                message = messages.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                message = {}
            if message is None:  # pipe closed: the child has exited or is exiting
                while child.poll() is None:  # tearing down a torch process can take a while: keep beating
                    try:
                        self._quietly(self.store.beat, job_id, attempt)
                    except Superseded:
                        break  # the final write will be refused; nothing to stop
                    time.sleep(POLL_INTERVAL_S)
                child.wait()
                break
            if message.get("event") == protocol.STARTED:
                started = True
            elif message.get("event") == protocol.PROGRESS:
                last_progress = message
            elif message.get("event") in protocol.FINAL_EVENTS:
                outcome = message
            now = time.monotonic()
            if now - last_write >= PROGRESS_WRITE_INTERVAL_S:
                # Redis may be restarting: the child goes on, progress is written once it is back.
                progress = {"stage": last_progress["stage"], "progress": last_progress["progress"]} if last_progress else {}
                try:
                    if self._quietly(self.store.beat, job_id, attempt, default=False, **progress):
                        stop_reason = "cancelled"
                    last_progress = None
                except Superseded:
                    stop_reason = "superseded"
                last_write = now
            if not stop_reason and now > deadline:
                stop_reason = "timeout"
            if stop_reason:
                _kill_group(child)
                break

        if stop_reason == "superseded":
            _kill_group(child)
            log.warning("job %s: attempt %d was superseded (taken over, cancelled or deleted); its child is "
                        "stopped and it writes nothing", job_id, attempt, extra={"job_id": job_id})
            return jobs.RUNNING, False
        if stop_reason == "cancelled":
            return self._finish(job_id, attempt, jobs.CANCELLED)
        if stop_reason == "timeout":
            return self._finish(job_id, attempt, jobs.FAILED, error=problem(
                "job-timeout", "Time limit exceeded",
                f"the compression did not finish within the job time limit of {self.settings.job_timeout_s} s "
                "and was stopped",
            ))
        if memory.exceeded:
            return self._finish(job_id, attempt, jobs.FAILED, error=problem(
                "out-of-memory", "Out of memory",
                f"{protocol.memory_message(self.settings)}: its processes reached {memory.peak_bytes >> 20} MB "
                "resident and were stopped"))
        return self._record_exit(job_id, attempt, deliveries, files, child.returncode, outcome, started)

    def _start_child(self, files: JobFiles, log_file: Any, write_fd: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "workers.job_process", str(files.root)]
        with sandbox.confined(self.settings, files, argv) as (command, sandbox_fds):  # sandbox_fds: its syscall filter
            return subprocess.Popen(
                command,
                cwd=files.root,
                env=protocol.child_environment(self.settings, write_fd, str(PROJECT_ROOT)),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=[write_fd, *sandbox_fds],
                start_new_session=True,  # its own process group, killed as a whole
            )

    def _record_exit(self, job_id: str, attempt: int, deliveries: int, files: JobFiles, returncode: int,
                     outcome: dict[str, Any] | None, started: bool) -> tuple[str, bool]:
        refused_output = sandbox.confirm_outputs(files)
        if refused_output:
            return self._finish(job_id, attempt, jobs.FAILED, error=problem("invalid-output", "Invalid output",
                                                                            refused_output))
        if returncode == 0 and outcome and outcome["event"] == protocol.SUCCEEDED and files.output_model.exists():
            # bench/chaos.py counts these: a job whose compression completes twice ran twice.
            log.info("job %s: attempt %d completed its compression", job_id, attempt,
                     extra={"job_id": job_id, "event": "completed"})
            return self._publish(job_id, attempt, deliveries, files)
        if outcome and outcome["event"] == protocol.FAILED:
            if files.report.exists():  # a failed search's report (its trials) stays readable
                self.objects.publish_report(job_id, attempt, read_json(files.report))
            return self._finish(job_id, attempt, jobs.FAILED, error=protocol.outcome_problem(outcome))
        return self._finish(job_id, attempt, jobs.FAILED, error=protocol.died(returncode, self.settings, started,
                                                                              sandbox.setup_error_in(files.process_log)))

    def _publish(self, job_id: str, attempt: int, deliveries: int, files: JobFiles) -> tuple[str, bool]:
        """Publish this attempt's output under attempt-specific names (``ObjectStore.publish``), then
        record success (fenced); the digest recorded is that of the file published."""
        try:
            self._until_redis(self.store.beat, job_id, attempt)  # still ours? (raises Superseded)
        except Superseded:
            return jobs.RUNNING, False
        report = read_json(files.report)
        report["deliveries"] = deliveries
        with self._beating(job_id, attempt):
            published = self.objects.publish(job_id, attempt, files, report)
        state, won = self._finish(job_id, attempt, jobs.SUCCEEDED, result=_result_summary(published, report),
                                  progress=1.0, stage="done", warnings=report.get("warnings", []))
        if not won:
            self.objects.withdraw(job_id, attempt)
        return state, won

    @contextlib.contextmanager
    def _beating(self, job_id: str, attempt: int) -> Iterator[None]:
        """Heartbeats while the supervisor itself works (staging inputs, uploading the output): a long
        transfer to or from an object store is not a dead worker, and must not be taken over."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(PROGRESS_WRITE_INTERVAL_S):
                try:
                    self._quietly(self.store.beat, job_id, attempt)
                except Superseded:
                    return  # the fenced writes after the transfer are refused; nothing to do here

        thread = threading.Thread(target=beat, name=f"beat-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _finish(self, job_id: str, attempt: int, state: str, **fields: Any) -> tuple[str, bool]:
        """Record the final state (fenced by ``attempt``), however long Redis takes to come back.

        There is no cap: giving up would leave the job ``running`` to be taken over and run
        again, although its outcome is known. Meanwhile the message stays unacknowledged.
        """
        final = self._until_redis(self.store.finish, job_id, state, attempt, finished_at=utc_now(), **fields)
        return final or "missing", final == state

    @staticmethod
    def _until_redis(call, *args: Any, **kwargs: Any) -> Any:
        """``call``, retried while Redis is unreachable (back-off up to 5 s)."""
        delay = 0.5
        while True:
            try:
                return call(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                log.warning("Redis unreachable (%s); retrying in %.1f s", error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    @staticmethod
    def _quietly(call, *args: Any, default: Any = None, **kwargs: Any) -> Any:
        """``call``, or ``default`` while Redis is unreachable."""
        try:
            return call(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            log.warning("Redis unreachable (%s); the job goes on", error)
            return default


def _result_summary(model: Path, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "bytes": model.stat().st_size,
        "sha256": file_sha256(model),
        "format": report.get("format", {}).get("output", TORCHSCRIPT),
        "size_ratio": report["size"]["ratio"],
        "latency_ratio": report["latency"]["ratio"],
        "cosine_similarity": report["fidelity"]["cosine_similarity"],
        "top1_agreement": report["fidelity"]["top1_agreement"],
    }


def _kill_group(child: subprocess.Popen) -> None:
    _signal_group(child)
    child.wait()


def _signal_group(child: subprocess.Popen) -> None:
    """SIGKILL the child's process group (from any thread; the supervisor's loop reaps it)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _input_digests(job: dict[str, Any]) -> dict[str, str]:
    """The SHA-256 of each uploaded file as the API computed it on arrival, by ``JobFiles`` name."""
    return {name: job[field]["sha256"] for field, name in (("input", "input_model"), ("student", "input_student"),
                                                           ("data", "input_data")) if job.get(field)}
