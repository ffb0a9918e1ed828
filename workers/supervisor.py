"""Supervise one job: claim it, run its compression in a fresh child process, record the outcome.

The child (``workers.job_process``) is a new interpreter per job, in its own process
group, so a segfault, an out-of-memory kill or a runaway model ends that job only.
Progress comes back as JSON lines on a pipe, watched by ``workers.child_watch``; the child never
talks to Redis.

The child runs the uploaded model, so it is an untrusted client: every line it sends is bounded
and checked (``job_protocol.read_messages``), its report is bounded and type-checked and the
figures the supervisor can measure are measured, not believed (``_publish``, ``workers.job_result``); its memory, its
``/tmp``, its ``output/``, its printed output and its wall clock are bounded. Whatever goes wrong
in the supervisor itself while a child runs kills the child and fails the job (``internal-error``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from modelpress import jobs
from modelpress.artifacts import NotPlainFile
from modelpress.config import Settings
from modelpress.fault_injection import fault_point
from modelpress.jobs import JobStore, Superseded, connect, utc_now
from modelpress.object_stores import open_object_store
from modelpress.objectstore import InputsCorrupt, InputsMissing, ObjectStore
from modelpress.storage import JobFiles, Storage
from modelpress.targets import TARGETS
from workers import job_protocol as protocol, sandbox, warm_sandbox
from workers.child_watch import (
    PROGRESS_WRITE_INTERVAL_S,
    kill_group as _kill_group,
    signal_group as _signal_group,
    watch_child,
)
from workers.job_protocol import InvalidReport, problem
from workers.job_result import measure_sizes, result_summary
from workers.memory import MemoryWatch
from workers.process_log import ProcessLog
from workers.target_report import check_targets
from workers.warm_sandbox import Launch

log = logging.getLogger("modelpress.worker")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
JOB_PROCESS = protocol.JOB_PROCESS  # the child's command; its job directory follows


class TenantBusy(Exception):
    """The job's tenant already runs its cap of jobs (``MODELPRESS_MAX_RUNNING_JOBS``); the job stays
    queued and its delivery should be sent again shortly."""


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        objects: ObjectStore | None = None,
        child_command: tuple[str, ...] = JOB_PROCESS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.objects = objects or open_object_store(settings, storage)
        self.child_command = child_command
        # The next job's process started ahead (workers/warm_sandbox.py); never for another child command.
        self.warm = warm_sandbox.shared() if warm_sandbox.enabled(settings) and child_command == JOB_PROCESS else None

    @classmethod
    @functools.lru_cache(maxsize=4)
    def from_settings(cls, settings: Settings) -> Supervisor:
        return cls(settings, JobStore(connect(settings.redis_url)), Storage(settings.data_dir))

    def run(self, job_id: str, generation: int | None = None) -> tuple[str, bool]:
        """Run the job to a final state; return that state and whether this call moved the job there.

        ``generation`` is the message's enqueue generation: a message superseded by a re-send
        is dropped. The claim is one atomic step; from then on every write carries its attempt.
        """
        taken = time.monotonic()  # the job's startup is timed from here (report timings_s.startup)
        fault_point("before-claim", job_id, self.settings.data_dir)
        claim = self.store.claim(job_id, generation, self.settings.heartbeat_stale_s, self.settings.max_running_jobs)
        if claim.outcome == "tenant-busy":
            log.info(
                "job %s: its tenant runs %d jobs already; it stays queued",
                job_id,
                self.settings.max_running_jobs,
                extra={"job_id": job_id},
            )
            raise TenantBusy(job_id)
        if claim.outcome != "claimed":
            log.info(
                "job %s: delivery skipped (%s, job %s)", job_id, claim.outcome, claim.state, extra={"job_id": job_id}
            )
            return claim.state or "missing", False
        if claim.deliveries > self.settings.max_deliveries:
            return self._finish(
                job_id,
                claim.attempt,
                jobs.FAILED,
                error=problem(
                    "worker-lost",
                    "Worker lost",
                    f"the job's worker stopped {claim.deliveries - 1} times while running it "
                    f"(limit {self.settings.max_deliveries}); it is not retried again",
                ),
            )
        if claim.deliveries > 1:
            log.warning("job %s: delivery %d after its worker stopped; running it again", job_id, claim.deliveries)
        log.info("job %s: running (delivery %d)", job_id, claim.deliveries)
        job = self.store.get(job_id) or {}
        try:
            with self._beating(job_id, claim.attempt):  # with S3: inputs staged into a private directory
                files = self.objects.workspace(job_id, claim.attempt, _input_digests(job))
        except InputsMissing as missing:
            return self._finish(
                job_id,
                claim.attempt,
                jobs.FAILED,
                error=problem(
                    "inputs-missing",
                    "Inputs missing",
                    f"the job's uploaded files are gone from the object store ({missing})",
                ),
            )
        except InputsCorrupt as corrupt:
            return self._finish(
                job_id,
                claim.attempt,
                jobs.FAILED,
                error=problem(
                    "inputs-corrupt",
                    "Inputs corrupt",
                    f"the job's uploaded files changed in the object store: {corrupt}; submit the job again",
                ),
            )
        try:
            return self._run_child(job_id, claim.attempt, claim.deliveries, files, self.time_limit_s(job), taken)
        finally:
            self.objects.release(job_id, claim.attempt)

    def time_limit_s(self, job: dict[str, Any]) -> int:
        """The job's wall-clock limit: its spec's ``time_limit_s`` when lower, else the operator's."""
        asked = (job.get("spec") or {}).get("time_limit_s")
        limit = self.settings.job_timeout_s
        return min(limit, asked) if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else limit

    # ------------------------------------------------------------------ the child process

    def _run_child(
        self, job_id: str, attempt: int, deliveries: int, files: JobFiles, time_limit_s: int, taken: float
    ) -> tuple[str, bool]:
        launch, launching = None, time.monotonic()  # the time limit counts from here, warm or cold
        if self.warm:
            with self._beating(job_id, attempt):  # it may wait for a process still importing
                launch = self.warm.take(self.settings, job_id, files, taken)
        if launch is None:
            launching = time.monotonic()  # no warm process after all: only the cold start counts
            read_fd, write_fd = os.pipe()
            log_read, log_write = os.pipe()
            try:
                child = self._start_child(files, log_write, write_fd)
            except OSError as error:  # bubblewrap (or Python) is missing: no unconfined fallback
                for fd in (read_fd, write_fd, log_read, log_write):
                    os.close(fd)
                return self._finish(
                    job_id,
                    attempt,
                    jobs.FAILED,
                    error=protocol.sandbox_unavailable(
                        f"{self.settings.bwrap} could not be started ({error.strerror or error})"
                    ),
                )
            os.close(write_fd)
            os.close(log_write)
            launch = Launch(child, read_fd, log_read, taken)
        launch.limit_from = launching
        child, read_fd = launch.child, launch.progress_fd
        output = ProcessLog(launch.log_fd, files.process_log).start()
        watch = MemoryWatch(
            child.pid,
            self.settings.job_memory_mb << 20,
            functools.partial(_signal_group, child),
            files.output_model.parent,
            protocol.output_limit_bytes(files),
            protocol.MAX_OUTPUT_ENTRIES,
        ).start()
        try:
            return self._watch_child(job_id, attempt, deliveries, files, launch, read_fd, watch, output, time_limit_s)
        except Exception:  # a bug or an unforeseen input here must not leave a child running unwatched
            log.exception("job %s: the supervisor failed; its child is stopped", job_id, extra={"job_id": job_id})
            _kill_group(child)
            return self._finish(
                job_id,
                attempt,
                jobs.FAILED,
                error=problem(
                    "internal-error",
                    "Internal error",
                    "the worker failed while supervising the job; its process was stopped (the worker's log says why)",
                ),
            )
        finally:
            watch.stop()
            output.finish()
            if self.warm:
                self.warm.job_ended(launch, self.settings)

    def _watch_child(
        self,
        job_id: str,
        attempt: int,
        deliveries: int,
        files: JobFiles,
        launch: Launch,
        read_fd: int,
        watch: MemoryWatch,
        output: ProcessLog,
        time_limit_s: int,
    ) -> tuple[str, bool]:
        beat = functools.partial(self._quietly, self.store.beat, job_id, attempt)
        child = launch.child
        end = watch_child(child, read_fd, beat, time_limit_s, launch.limit_from)
        if launch.ready_at is None:
            launch.ready_at = end.ready_at
        output.finish()

        if end.stop_reason == "superseded":
            _kill_group(child)
            log.warning(
                "job %s: attempt %d was superseded (taken over, cancelled or deleted); its child is "
                "stopped and it writes nothing",
                job_id,
                attempt,
                extra={"job_id": job_id},
            )
            return jobs.RUNNING, False
        if end.stop_reason == "cancelled":
            return self._finish(job_id, attempt, jobs.CANCELLED)
        if end.violation is not None:
            log.warning("job %s: protocol violation: %s", job_id, end.violation.reason, extra={"job_id": job_id})
            return self._finish(job_id, attempt, jobs.FAILED, error=protocol.protocol_violation(end.violation))
        if end.stop_reason == "timeout":
            return self._finish(
                job_id,
                attempt,
                jobs.FAILED,
                error=problem(
                    "job-timeout",
                    "Time limit exceeded",
                    f"the compression did not finish within the job time limit of {time_limit_s} s and was stopped",
                ),
            )
        if watch.exceeded:
            return self._finish(
                job_id,
                attempt,
                jobs.FAILED,
                error=problem(
                    "out-of-memory",
                    "Out of memory",
                    f"{protocol.memory_message(self.settings)}: its processes reached {-(-watch.peak_bytes >> 20)} MB "
                    "resident (memory plus the files in its /tmp and /dev and its memory files) and were stopped",
                ),
            )
        if watch.output_exceeded or watch.check_output():  # while running, or in the last moments before exit
            shutil.rmtree(
                files.output_model.parent, ignore_errors=True
            )  # nothing of it is kept: the disk is the host's
            return self._finish(
                job_id,
                attempt,
                jobs.FAILED,
                error=protocol.output_too_large(watch.output_limit_bytes, watch.output_bytes, watch.output_entries),
            )
        return self._record_exit(job_id, attempt, deliveries, files, child.returncode, end.outcome, end.started, launch)

    def _start_child(self, files: JobFiles, output_fd: int, write_fd: int) -> subprocess.Popen:
        argv = [*self.child_command, str(files.root)]
        with sandbox.confined(self.settings, files, argv) as (command, sandbox_fds):  # sandbox_fds: its syscall filter
            return subprocess.Popen(
                command,
                cwd=files.root,
                env=protocol.child_environment(self.settings, write_fd, str(PROJECT_ROOT)),
                stdin=subprocess.DEVNULL,
                stdout=output_fd,  # a pipe: the supervisor keeps only the tail (workers/process_log.py)
                stderr=subprocess.STDOUT,
                pass_fds=[write_fd, *sandbox_fds],
                start_new_session=True,  # its own process group, killed as a whole
            )

    def _record_exit(
        self,
        job_id: str,
        attempt: int,
        deliveries: int,
        files: JobFiles,
        returncode: int,
        outcome: dict[str, Any] | None,
        started: bool,
        launch: Launch,
    ) -> tuple[str, bool]:
        refused_output = sandbox.confirm_outputs(files)
        if refused_output:
            return self._finish(
                job_id, attempt, jobs.FAILED, error=problem("invalid-output", "Invalid output", refused_output)
            )
        if returncode == 0 and outcome and outcome["event"] == protocol.SUCCEEDED and files.output_model.exists():
            # bench/chaos.py counts these: a job whose compression completes twice ran twice.
            log.info(
                "job %s: attempt %d completed its compression",
                job_id,
                attempt,
                extra={"job_id": job_id, "event": "completed"},
            )
            return self._publish(job_id, attempt, deliveries, files, launch)
        if outcome and outcome["event"] == protocol.FAILED:
            if files.report.exists():  # a failed search's report (its trials) stays readable
                try:
                    self.objects.publish_report(job_id, attempt, protocol.read_report(files.report))
                except InvalidReport as refused:
                    return self._finish(job_id, attempt, jobs.FAILED, error=protocol.invalid_report(refused))
            return self._finish(job_id, attempt, jobs.FAILED, error=protocol.outcome_problem(outcome))
        return self._finish(
            job_id,
            attempt,
            jobs.FAILED,
            error=protocol.died(returncode, self.settings, started, sandbox.setup_error_in(files.process_log)),
        )

    def _publish(self, job_id: str, attempt: int, deliveries: int, files: JobFiles, launch: Launch) -> tuple[str, bool]:
        """Publish this attempt's output under attempt-specific names (``ObjectStore.publish``), then
        record success (fenced); the digest recorded is that of the file published."""
        try:
            self._until_redis(self.store.beat, job_id, attempt)  # still ours? (raises Superseded)
        except Superseded:
            return jobs.RUNNING, False
        spec = (self._until_redis(self.store.get, job_id) or {}).get("spec") or {}
        try:
            report = protocol.read_report(files.report)
            succeeded = check_targets(
                report, tuple(spec.get("targets") or ()), bool(spec.get("targets_required")), files
            )
        except InvalidReport as refused:
            return self._finish(job_id, attempt, jobs.FAILED, error=protocol.invalid_report(refused))
        measure_sizes(report, files)
        warm_sandbox.stamp_report(report, launch)  # its startup, measured here
        report["deliveries"] = deliveries
        with self._beating(job_id, attempt):
            try:  # the artifacts before the report, which goes last (a reader never sees a partial result)
                for name in succeeded:
                    size, digest = self.objects.publish_artifact(job_id, attempt, files, TARGETS[name].file_name)
                    report["targets"][name].update(bytes=size, sha256=digest)  # measured, never the child's word
            except NotPlainFile as refused:
                self.objects.withdraw(job_id, attempt)
                return self._finish(
                    job_id,
                    attempt,
                    jobs.FAILED,
                    error=protocol.invalid_report(InvalidReport(f"'targets.{name}.file': {refused}")),
                )
            published = self.objects.publish(job_id, attempt, files, report)
        state, won = self._finish(
            job_id,
            attempt,
            jobs.SUCCEEDED,
            result=result_summary(published, report),
            progress=1.0,
            stage="done",
            warnings=report.get("warnings", []),
        )
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


def _input_digests(job: dict[str, Any]) -> dict[str, str]:
    """The SHA-256 of each uploaded file as the API computed it on arrival, by ``JobFiles`` name."""
    return {
        name: job[field]["sha256"]
        for field, name in (("input", "input_model"), ("student", "input_student"), ("data", "input_data"))
        if job.get(field)
    }
