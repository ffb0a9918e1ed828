"""The next job's process, started before its job: a pre-warmed sandbox (issue 28).

Starting bubblewrap, a fresh Python and importing torch and the engine takes seconds; a small job
compresses in a fraction of that. So while a worker waits, one job process is already started,
confined exactly as a cold one (``sandbox.confined``: the same bubblewrap command, syscall filter and
scrubbed environment) but with ``--warm``: it imports torch and the engine, says ``warm`` on its pipe
and blocks on stdin. Bubblewrap binds a job's folder when it starts, before the job is known, so:

- The process is started on a folder of its own, ``<data dir>/warm/<name>/job`` (read-only, empty
  but for ``input/``), whose ``output/`` is a bind of ``<name>/output``.
- At the hand-over (``take``) the job's inputs and spec are hard-linked into ``job/`` (a bind shows
  what is added to its folder at once), and ``<name>/output`` is *renamed* to the job's ``output/``:
  a bind mount follows its folder, so the process writes straight into the job's ``output/``, and
  everything after (memory and output watch, ``confirm_outputs``, publishing) reads the job's files
  as for a cold process. Then one line on its stdin: it says ``started`` and goes on as a cold
  process does from there (its confinement checked, ``_limit_resources`` from the job's inputs).

Each process serves one job and is never reused: the next is started in the background as soon as
one is taken, so its import overlaps the job (which it slows a little on a small machine: about 20%
of a tiny job's measuring on 2 cores) instead of delaying the next job by all of it.
One older than ``MAX_AGE_S`` or started under other settings (the command, the runtime's mounts, the
environment) is replaced; one that died, is not ready within ``READY_WAIT_S``, or cannot take the
files (inputs on another filesystem) is discarded and the job starts cold, as before.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import select
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.config import Settings
from modelpress.storage import JobFiles
from workers import fork_sandbox, job_protocol as protocol, sandbox, warm_folders
from workers.child_watch import signal_group
from workers.warm_folders import JOB_LABEL, WARM_DIR, sweep

log = logging.getLogger("modelpress.worker")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A waiting process older than this is replaced: code deployed meanwhile, or a long-lived process's
# drift, never reaches a job more than this late. Costs one start (~2.5 CPU seconds) per idle bound.
MAX_AGE_S = 600.0
READY_WAIT_S = 30.0  # a job waits this long for a process still importing (a cold start takes as long)
START_TIMEOUT_S = 120.0  # a process that has not said ``warm`` by then is stopped
DISCARD_WAIT_S = 10.0  # for the starter to stop reading a discarded process's pipe (it ends on its death)
_INPUTS = ("input_model", "input_student", "input_data", "spec")


@dataclass
class Launch:
    """A job's process as the supervisor watches it, started for the job (cold) or handed to it (warm)."""

    child: subprocess.Popen | fork_sandbox.Forked
    progress_fd: int
    log_fd: int
    taken: float  # time.monotonic() when the supervisor took the job
    warm: bool = False
    folder: Path | None = None  # the warm folder, removed when the job ends
    owner_fd: int = -1  # the warm folder's owner lock, released when it is removed
    # When its process was asked for (time.monotonic()): the job's time limit counts from here, so a
    # job that waited for a process still importing spends its own time, as a cold start would.
    limit_from: float | None = None
    ready_at: float | None = None  # when the process said ``ready`` (set by the supervisor's loop)
    forked: bool = False  # by the fork server (workers/fork_sandbox.py), not started by bubblewrap


@dataclass
class _Waiting:
    child: subprocess.Popen | fork_sandbox.Forked
    folder: Path
    key: tuple[Any, ...]
    progress_fd: int
    log_fd: int
    handover_fd: int
    owner_fd: int
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)
    failed: bool = False
    forked: bool = False  # by the fork server (workers/fork_sandbox.py), not started by bubblewrap


def enabled(settings: Settings) -> bool:
    """Pre-started only when confined: the bind mount is what carries ``output/`` to the job."""
    return settings.warm_sandbox and settings.sandbox == "on"


@functools.lru_cache(maxsize=1)
def shared() -> WarmSandbox:
    """This worker process's one waiting process (one per process, whatever the supervisors)."""
    pool = WarmSandbox()
    atexit.register(pool.close)
    return pool


def stamp_report(report: dict[str, Any], launch: Launch) -> None:
    """The supervisor's own measure of the start, over whatever the child wrote there: ``timings_s.startup``,
    seconds from taking the job to the process being ready to compress, and ``sandbox.start``."""
    ready = launch.ready_at if launch.ready_at is not None else time.monotonic()
    timings = report.get("timings_s") if isinstance(report.get("timings_s"), dict) else {}
    report["timings_s"] = {**timings, "startup": round(max(0.0, ready - launch.taken), 3)}
    section = report.get("sandbox") if isinstance(report.get("sandbox"), dict) else {}
    report["sandbox"] = {
        **section,
        "start": "warm" if launch.warm else "cold",
        "started_by": "fork server" if launch.forked else "bubblewrap",
    }


class WarmSandbox:
    """At most one waiting job process, started by one thread that lives as long as the worker process:
    bubblewrap's ``--die-with-parent`` follows the *thread* that started it (PR_SET_PDEATHSIG), so a
    short-lived starter would kill its process, and a worker that dies takes its process with it."""

    def __init__(self, command: tuple[str, ...] = protocol.JOB_PROCESS) -> None:
        self.command = command
        self._lock = threading.Condition()
        self._waiting: _Waiting | None = None
        self._wanted: Settings | None = None  # keep a process waiting for these settings
        self._thread: threading.Thread | None = None
        self._launching = False  # the starter is starting one now (it is waiting within milliseconds)
        self._closed = False
        # Processes are forked from a server that imported torch once (workers/fork_sandbox.py); started
        # with bubblewrap instead when it cannot be had (``_forks_broken`` says why, logged once).
        self._forks: fork_sandbox.ForkServer | None = None
        self._forks_broken: str | None = None

    def prepare(self, settings: Settings) -> None:
        """Have a process waiting for the next job (started in the background)."""
        with self._lock:
            if self._closed:
                return
            self._wanted = settings
            if self._thread is None:
                self._thread = threading.Thread(target=self._keep_one, name="warm-sandbox", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def take(self, settings: Settings, job_id: str, files: JobFiles, taken: float) -> Launch | None:
        """The waiting process with the job's files handed over, or None: start the job cold."""
        with self._lock:
            if self._waiting is None and self._launching:  # being started: as good as waiting
                self._lock.wait_for(lambda: not self._launching, READY_WAIT_S)
            waiting, self._waiting = self._waiting, None  # the starter begins the next one at once
            self._lock.notify_all()
        if waiting is None:
            return None
        why = self._unusable(waiting, settings)
        if why is None:
            try:
                _hand_over(waiting, job_id, files)
                return Launch(
                    waiting.child,
                    waiting.progress_fd,
                    waiting.log_fd,
                    taken,
                    warm=True,
                    folder=waiting.folder,
                    owner_fd=waiting.owner_fd,
                    forked=waiting.forked,
                )
            except OSError as error:
                why = f"the job's files could not be handed over ({error})"
        log.warning(
            "job %s: the pre-started sandbox is not used (%s); starting one", job_id, why, extra={"job_id": job_id}
        )
        _discard(waiting)
        return None

    def job_ended(self, launch: Launch | None, settings: Settings) -> None:
        """The job's process has ended: remove its warm folder; have one waiting (after a cold start,
        or a start that failed: one try per job, so a broken sandbox never spins)."""
        if launch is not None and launch.folder is not None:
            warm_folders.remove(launch.folder, launch.owner_fd)
        self.prepare(settings)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, None
            self._lock.notify_all()
        if waiting is not None:
            _discard(waiting)
        self._retire_forks()

    # ------------------------------------------------------------------ the starter thread

    def _unusable(self, waiting: _Waiting, settings: Settings) -> str | None:
        if waiting.key != _key(settings, self.command):
            return "it was started under other settings"
        if time.monotonic() - waiting.started > MAX_AGE_S:
            return f"it is older than {MAX_AGE_S:.0f} s"
        if not waiting.ready.wait(READY_WAIT_S) or waiting.failed:
            return "it did not become ready"
        if waiting.child.poll() is not None:
            return f"it exited meanwhile (status {waiting.child.returncode})"
        return None

    def _keep_one(self) -> None:
        swept = False
        while True:
            with self._lock:
                while not self._closed and not self._wanted_start():
                    self._lock.wait(self._until_too_old())
                if self._closed:
                    return
                settings, stale = self._wanted, self._waiting
                self._waiting, self._launching = None, settings is not None
            if stale is not None:
                _discard(stale)  # too old, or other settings wanted
            if settings is None:
                continue
            try:
                if not swept:
                    sweep(settings.data_dir)
                    swept = True
                self._start(settings)
            except Exception:  # never leave a job waiting on a starter that died
                log.exception("the pre-started sandbox failed; jobs start cold until the next")
                with self._lock:
                    self._launching, self._wanted = False, None
                    self._lock.notify_all()

    def _wanted_start(self) -> bool:
        waiting = self._waiting
        if self._wanted is None:
            return False
        return (
            waiting is None
            or time.monotonic() - waiting.started > MAX_AGE_S
            or waiting.key != _key(self._wanted, self.command)
        )

    def _until_too_old(self) -> float | None:
        if self._waiting is None:
            return None
        return max(0.05, MAX_AGE_S - (time.monotonic() - self._waiting.started) + 0.05)

    def _start(self, settings: Settings) -> None:
        forks = self._fork_server(settings)
        waiting = _launch(settings, self.command, forks)
        if waiting is None and forks is not None:
            self._forks_failed("a fork could not be had")
            waiting = _launch(settings, self.command, None)
        with self._lock:
            self._launching = False
            self._lock.notify_all()
            if waiting is None:
                self._wanted = None  # not again before the next job: a broken sandbox must not spin
                return
            closed = self._closed
            if not closed:
                self._waiting = waiting
        if closed:
            waiting.failed = True
            waiting.ready.set()  # nothing reads its pipe: _discard may close it
            _discard(waiting)
            return
        ready = _await_warm(waiting.progress_fd, START_TIMEOUT_S)
        waiting.failed = not ready
        if not ready and waiting.forked:
            self._forks_failed(f"a forked sandbox was not built: {_complaint(waiting.log_fd) or 'no reason given'}")
        waiting.ready.set()
        if not ready:
            log.warning(
                "the pre-started sandbox did not become ready (exit status %s); jobs start cold until the next",
                waiting.child.poll(),
            )
            with self._lock:
                mine = self._waiting is waiting
                if mine:
                    self._waiting, self._wanted = None, None
            if mine:
                _discard(waiting)

    def _fork_server(self, settings: Settings) -> fork_sandbox.ForkServer | None:
        """The fork server for these settings (started now if need be: one import of torch), or None:
        start with bubblewrap. Replaced when older than ``MAX_AGE_S``, as a waiting process is."""
        if self._forks_broken is not None or self.command != protocol.JOB_PROCESS:
            return None
        key = _key(settings, self.command)
        forks = self._forks
        if forks is not None and (forks.key != key or not forks.alive() or forks.age() > MAX_AGE_S):
            self._retire_forks()
            forks = None
        if forks is None:
            try:
                forks = self._forks = fork_sandbox.ForkServer(settings, key, str(PROJECT_ROOT))
            except OSError as error:
                self._forks_failed(f"the fork server could not be started ({error})")
        return forks

    def _forks_failed(self, why: str) -> None:
        log.warning("pre-started sandboxes are started with bubblewrap from now on: %s", why)
        self._forks_broken = why
        self._retire_forks()

    def _retire_forks(self) -> None:
        forks, self._forks = self._forks, None
        if forks is not None:
            forks.close()  # it exits once the jobs forked from it have ended


def _complaint(log_fd: int) -> str | None:
    """What a process that failed before saying ``warm`` wrote (its last ``bwrap:`` line), without blocking."""
    data = b""
    while len(data) < 65536 and select.select([log_fd], [], [], 0)[0]:
        chunk = os.read(log_fd, 65536)
        if not chunk:
            break
        data += chunk
    return sandbox.setup_error(data.decode("utf-8", errors="replace"))


def _key(settings: Settings, command: tuple[str, ...]) -> tuple[Any, ...]:
    """What makes a process started now differ from one started earlier: the settings, the command,
    the runtime's mounts and GPU nodes, the environment the child gets (minus its pipe's number)."""
    environment = protocol.child_environment(settings, 0, str(PROJECT_ROOT))
    return settings, command, sandbox.fingerprint(settings), tuple(sorted(environment.items()))


def _launch(settings: Settings, command: tuple[str, ...], forks: fork_sandbox.ForkServer | None) -> _Waiting | None:
    """A process started for a new warm folder: forked by ``forks``, else by bubblewrap. None: it could not
    be (logged; with ``forks``, the caller tries bubblewrap)."""
    folder, owner_fd = warm_folders.made_and_owned(
        settings.data_dir / WARM_DIR
    )  # (an OSError: logged, jobs start cold)
    files = JobFiles(folder / "job")
    try:
        (folder / "job" / "input").mkdir(parents=True)
        (folder / "output").mkdir()
        key = _key(settings, command)
        progress_read, progress_write = os.pipe()
    except BaseException:
        warm_folders.remove(folder, owner_fd)
        raise
    log_read, log_write = os.pipe()
    handover_read, handover_write = os.pipe()
    try:
        with sandbox.confined(
            settings, files, [*command, "--warm", str(files.root)], output_source=folder / "output"
        ) as (argv, sandbox_fds):
            if forks is not None:
                child: subprocess.Popen | fork_sandbox.Forked = forks.spawn(
                    argv, handover_read, log_write, progress_write, sandbox_fds[0]
                )
            else:
                child = subprocess.Popen(
                    argv,
                    cwd=files.root,
                    env=protocol.child_environment(settings, progress_write, str(PROJECT_ROOT)),
                    stdin=handover_read,
                    stdout=log_write,
                    stderr=subprocess.STDOUT,
                    pass_fds=[progress_write, *sandbox_fds],
                    start_new_session=True,
                )
    except OSError as error:
        how = "forked" if forks is not None else "started"
        log.warning("the pre-started sandbox could not be %s (%s); jobs start cold", how, error)
        for fd in (progress_read, log_read, handover_write):
            os.close(fd)
        warm_folders.remove(folder, owner_fd)
        return None
    finally:
        for fd in (progress_write, log_write, handover_read):
            os.close(fd)
    return _Waiting(child, folder, key, progress_read, log_read, handover_write, owner_fd, forked=forks is not None)


def _await_warm(progress_fd: int, timeout: float) -> bool:
    """Whether the process said ``warm`` in time: one short line, before any job's file is in its reach."""
    deadline, line = time.monotonic() + timeout, b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(line) > 64 or not select.select([progress_fd], [], [], remaining)[0]:
            return False
        chunk = os.read(progress_fd, 64)  # nothing follows this line before the hand-over
        if not chunk:
            return False
        line += chunk
    message = protocol.parse_message(line[:-1])
    return isinstance(message, dict) and message["event"] == protocol.WARM


def _hand_over(waiting: _Waiting, job_id: str, files: JobFiles) -> None:
    inside = JobFiles(waiting.folder / "job")
    for name in _INPUTS:
        if getattr(files, name).exists():
            os.link(getattr(files, name), getattr(inside, name))  # read-only in there, like the job's own
    output = files.output_model.parent
    if output.exists():  # an earlier attempt's: removed with the warm folder
        os.rename(output, waiting.folder / "earlier-output")
    os.rename(waiting.folder / "output", output)
    (waiting.folder / JOB_LABEL).write_text(job_id)
    handover_fd, waiting.handover_fd = waiting.handover_fd, -1
    try:
        os.write(handover_fd, b"job\n")
    finally:
        os.close(handover_fd)


def _discard(waiting: _Waiting) -> None:
    signal_group(waiting.child)
    waiting.child.wait()
    # The starter thread may still be reading its pipe (_await_warm; a job gave up waiting for it):
    # closing the descriptor under it would let it read whatever reuses the number next (a cold job's
    # pipe). Its process is dead, so the read ends at once; only then are the descriptors closed.
    if not waiting.ready.wait(DISCARD_WAIT_S):
        log.warning("a discarded pre-started sandbox's pipe is still being read; its descriptors are left open")
        warm_folders.remove(waiting.folder, waiting.owner_fd)
        return
    for fd in (waiting.progress_fd, waiting.log_fd, waiting.handover_fd):
        if fd >= 0:
            os.close(fd)
    warm_folders.remove(waiting.folder, waiting.owner_fd)
