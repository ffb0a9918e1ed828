"""Pre-warmed job processes forked from one that imported torch once (issue 28): a fork server.

A warm job process started by bubblewrap (``workers.warm_sandbox``) still pays a fresh ``import torch``
(about 2 CPU seconds) per job: on a small machine that import, not the job, bounds how many small jobs
a worker finishes a minute. So a worker keeps one *server* process: started with the job process's
scrubbed environment (``job_protocol.child_environment``), it imports torch and the engine, then
forks one process per warm sandbox asked for. The fork builds the sandbox itself, exactly as
bubblewrap would from the same command line (``sandbox.job_command``, interpreted here option by
option, so the mounts have one source of truth):

- ``A`` (forked from the server): its own session; new user and PID namespaces (the worker's uid
  mapped to the sandbox's, as ``--uid``/``--gid`` say); forks ``B``, sends B's host PID to the worker
  (which kills the namespace through it) and waits for its acknowledgement, then execs a small monitor
  (``python -I -S``: a few MB, where the server's copy counts hundreds into the job's memory watch)
  that waits for ``B`` and reports its exit status as bubblewrap does (signal N: 128 + N) on a socket.
- ``B``: PID 1 of the new PID namespace; new mount, network, IPC, UTS and cgroup namespaces;
  a tmpfs root holding only what the command binds (``/proc`` of its own namespace, a minimal ``/dev``,
  a private sized ``/tmp``, the read-only runtime, the job's folder); ``pivot_root`` into it, the
  host's tree detached; a nested user namespace and no more; every capability dropped,
  ``no_new_privs``, the syscall filter read from the descriptor bubblewrap would have read it from.
  Then a session of its own, it forks ``C`` and execs a small init (``_INIT``: not dumpable, reaps,
  ends with C's status); no job code ever runs as PID 1.
- ``C``: PID 2, as bubblewrap's command is; once the init is not dumpable it runs
  ``workers.job_process --warm``, which says ``warm`` and waits for its job as a bubblewrap-started
  one does.

Nothing of a job reaches the server: it never opens a job's file, and its memory holds only what a
job process imports anyway. Each job still gets a fresh process, PID namespace, mount namespace and
``/tmp``, never reused. The process checks its own confinement after the hand-over
(``job_process.confinement_facts``) as every job process does. If the server cannot be started or
a fork cannot build its sandbox, ``warm_sandbox`` falls back to starting its process with bubblewrap.
Only Linux on x86_64 and aarch64 (the syscall filter's machines).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from modelpress.config import Settings
from workers import job_protocol as protocol, namespaces

SERVER_READY_TIMEOUT_S = 120.0
REQUEST_BYTES = 1 << 20  # a command line of mounts: a few KB
# The descriptors a fork receives, in this order, and where the job process finds them.
_STDIN, _LOG, _PROGRESS, _STATUS, _SECCOMP = range(5)
PROGRESS_FD_NUMBER = 3  # the job process's progress pipe (the server's environment says so)
_STATUS_FD_NUMBER = 4  # the monitor's end of the status socket
_SECCOMP_FD_NUMBER = 5  # the syscall filter, read by the job's process before it runs the job
_MONITOR = """
import os, sys
_, status = os.waitpid(int(sys.argv[1]), 0)
code = os.waitstatus_to_exitcode(status)
code = 128 - code if code < 0 else code
try:
    os.write(4, b"%d" % code)
    os.read(4, 1)
except OSError:
    pass
os._exit(code)
"""
# What ``B``, PID 1 of the job's PID namespace, becomes once the job's process (``C``) is forked: no job
# code ever runs as PID 1 (a job that is PID 1 could leave the process group and clear its parent-death
# signal, and outlive every kill); it reaps, and ends with C's status, which ends the namespace with it.
_INIT = """
import ctypes, os, signal, sys
# Not dumpable: the job, same uid, may then not open /proc/1/mem (without Yama, only the filter's
# ptrace rule stood between it and this process's memory); only then may the job go on (argv[2] closed).
if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
    os._exit(1)
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.close(int(sys.argv[2]))
job = int(sys.argv[1])
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        os._exit(1)
    if pid == job:
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
"""


# ----------------------------------------------------------------------------- the worker's side


class Forked:
    """A forked job process as the supervisor watches it: what it uses of ``subprocess.Popen``
    (``pid``, ``poll``, ``wait``, ``returncode``), and ``stop``. ``pid`` is the monitor's; its exit status
    arrives on the status socket (none: it was killed, -SIGKILL)."""

    def __init__(self, pid: int, status: socket.socket, init_pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._status = status
        self._lock = threading.Lock()
        self._pidfd = os.pidfd_open(pid)  # the monitor waits for the worker to read its status: alive now
        self._init_pidfd = init_pidfd

    def stop(self) -> None:
        """SIGKILL the sandbox's PID 1 and the monitor, through pidfds (never a reused PID). A signal from
        outside kills a namespace's init whatever it did to itself, and the kernel then kills every
        process of its PID namespace: nothing a job does inside outlives this."""
        with self._lock:
            if self.returncode is None:
                for pidfd in (self._init_pidfd, self._pidfd):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    def poll(self) -> int | None:
        return self._collect(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout or 0.0)
        return code

    def _collect(self, timeout: float | None) -> int | None:
        try:
            readable = self.returncode is None and select.select([self._status], [], [], timeout)[0]
        except (ValueError, OSError):  # another thread collected it and closed the socket meanwhile
            return self.returncode
        if readable:
            with self._lock:
                if self.returncode is None:
                    try:
                        data = self._status.recv(16)
                    except OSError:
                        data = b""
                    self.returncode = int(data) if data.isdigit() else -signal.SIGKILL
                    self._status.close()  # the monitor exits now
                    os.close(self._pidfd)
                    os.close(self._init_pidfd)
        return self.returncode


class ForkServer:
    """One server process and the forks asked of it (from one thread at a time: the warm starter)."""

    def __init__(self, settings: Settings, key: Any, project_root: str) -> None:
        self.key = key
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.fork_sandbox", str(theirs.fileno()), str(os.getpid())],
                env=protocol.child_environment(settings, PROGRESS_FD_NUMBER, project_root),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._socket = ours
        self.started = time.monotonic()
        ours.settimeout(SERVER_READY_TIMEOUT_S)
        try:
            if ours.recv(64) != b"ready":
                raise OSError("the fork server did not become ready")
        except BaseException:
            self.close()
            raise

    def spawn(self, argv: list[str], stdin: int, log_fd: int, progress_fd: int, seccomp_fd: int) -> Forked:
        """Fork a process that builds the sandbox ``argv`` (bubblewrap's command) describes and runs its job
        process; ``stdin``, ``log_fd`` (stdout and stderr) and ``progress_fd`` are the job process's."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            request = json.dumps({"argv": argv}).encode()
            socket.send_fds(self._socket, [request], [stdin, log_fd, progress_fd, theirs.fileno(), seccomp_fd])
            try:
                reply = json.loads(self._socket.recv(256))
            except ValueError:
                raise OSError("the fork server did not answer (it ended?)") from None
            if "pid" not in reply:
                raise OSError(f"the fork server refused: {reply.get('error')}")
            theirs.close()
            # The monitor's first line: the sandbox's PID 1 (host PID), kept from reuse until acknowledged.
            ours.settimeout(SERVER_READY_TIMEOUT_S)
            line = b""
            while not line.endswith(b"\n") and len(line) < 32:
                chunk = ours.recv(32 - len(line))
                if not chunk:
                    raise OSError("the fork could not build its sandbox (see the job log)")
                line += chunk
            init_pidfd = os.pidfd_open(int(line))
            ours.settimeout(None)
            ours.sendall(b"k")
            return Forked(int(reply["pid"]), ours, init_pidfd)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def alive(self) -> bool:
        return self.process.poll() is None

    def age(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        """Stop taking forks. The server exits once its forks have ended (they die with it)."""
        self._socket.close()


# ----------------------------------------------------------------------------- the server


def serve(control: socket.socket, worker: int) -> None:
    namespaces.libc_call("prctl", namespaces.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the worker's starter thread
    if os.getppid() != worker:  # it died before that took effect
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forks are reaped by the kernel
    import torch  # noqa: F401  (what every job imports; threads are set in each fork, never here)

    import workers.engine.formats.program_check
    import workers.engine.formats.torchscript
    import workers.engine.run.pipeline
    import workers.job_process
    import workers.sandbox  # noqa: F401

    control.sendall(b"ready")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, REQUEST_BYTES, 5)
        except OSError:
            message, fds = b"", []
        if not message:
            break
        try:
            if len(fds) != 5:
                raise namespaces.SetupError(f"{len(fds)} descriptors received, 5 expected")
            argv = json.loads(message)["argv"]
            plan = namespaces.Plan.parse(argv)
            server = os.getpid()
            pid = os.fork()
            if pid == 0:
                control.close()
                _become_job(plan, fds, server)  # never returns
            reply: dict[str, Any] = {"pid": pid}
        except (namespaces.SetupError, ValueError, KeyError, TypeError, OSError) as error:
            reply = {"error": str(error)[:200]}
        finally:
            for fd in fds:
                os.close(fd)
        control.sendall(json.dumps(reply).encode())
    control.close()
    with contextlib.suppress(ChildProcessError):
        while True:  # forks die with this process: wait for the last (SIG_IGN: wait ends when none is left)
            os.wait()


def _become_job(plan: namespaces.Plan, received: list[int], server: int) -> None:
    """In the fork (``A``): never returns. Errors are written as bubblewrap writes its own, on stderr."""
    code = 1
    try:
        os.setsid()
        namespaces.libc_call("prctl", namespaces.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the server
        if os.getppid() != server:
            raise namespaces.SetupError("the fork server ended")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _arrange_descriptors(received)
        namespaces.enter_user_and_pid_namespaces(plan)
        myself = os.pidfd_open(os.getpid())  # B checks through it that A outlived B's PR_SET_PDEATHSIG
        pid = os.fork()
        if pid == 0:
            os.close(_STATUS_FD_NUMBER)
            _run_confined(plan, myself)  # never returns
        os.close(myself)
        os.write(_STATUS_FD_NUMBER, b"%d\n" % pid)  # B's host PID: the worker kills the namespace through it
        if os.read(_STATUS_FD_NUMBER, 1) != b"k":
            raise namespaces.SetupError("the worker did not take the sandbox's PID")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the job's pipes stay with B alone: they end when it does
            os.dup2(null, fd, inheritable=False)
        for fd in (null, PROGRESS_FD_NUMBER, _SECCOMP_FD_NUMBER):
            os.close(fd)
        os.set_inheritable(_STATUS_FD_NUMBER, True)
        # The job's command after B's PID: what ``ps`` shows (and the tests find) is whose monitor this is.
        monitor = [sys.executable, "-I", "-S", "-c", _MONITOR, str(pid), *plan.command[2:]]
        os.execv(sys.executable, monitor)  # B dies if this fails (namespaces.PR_SET_PDEATHSIG)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.write(2, f"bwrap: {error}\n".encode(errors="replace")[:500])
    os._exit(code)


def _arrange_descriptors(received: list[int]) -> None:
    """stdin 0, the log 1 and 2, progress 3, status 4, the filter 5; every other descriptor closed."""
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in received]  # above every target number
    targets = {
        _STDIN: (0,),
        _LOG: (1, 2),
        _PROGRESS: (PROGRESS_FD_NUMBER,),
        _STATUS: (_STATUS_FD_NUMBER,),
        _SECCOMP: (_SECCOMP_FD_NUMBER,),
    }
    for index, numbers in targets.items():
        for number in numbers:
            os.dup2(moved[index], number, inheritable=False)
    os.closerange(_SECCOMP_FD_NUMBER + 1, 2**31 - 1)  # close_range(2): every other descriptor, whatever its number


def _run_confined(plan: namespaces.Plan, parent: int) -> None:
    """``B``: PID 1 of the job's namespaces. Builds the sandbox, forks the job's process (``C``), then
    becomes a small init (``_INIT``); never returns. B keeps its parent-death signal: no job code runs in it."""
    code = 1
    try:
        namespaces.libc_call("prctl", namespaces.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the monitor
        if select.select([parent], [], [], 0)[0]:  # A ended before that took effect (getppid() is 0 in here)
            raise namespaces.SetupError("the monitor ended")
        os.close(parent)
        namespaces.confine(plan, _SECCOMP_FD_NUMBER)
        os.setsid()  # B and the job in a group of their own: kill(0, ...) from the job never reaches A
        go_read, go_write = os.pipe()
        job = os.fork()
        if job == 0:
            os.close(go_write)
            os.read(go_read, 1)  # until the init is no longer dumpable (it closes its end then)
            os.close(go_read)
            _run_job(plan)  # never returns
        os.close(go_read)
        os.set_inheritable(go_write, True)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2, PROGRESS_FD_NUMBER):  # the job's pipes end with the job
            os.dup2(null, fd, inheritable=fd < 3)
        os.close(null)
        # The folder last, as the monitor's (what ``ps`` shows, and what the tests read).
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", _INIT, str(job), str(go_write), plan.command[-1]])
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.write(2, f"bwrap: {error}\n".encode(errors="replace")[:500])
    os._exit(code)


def _run_job(plan: namespaces.Plan) -> None:
    """``C``: the job's process, PID 2 of its namespace, as bubblewrap's command is; never returns."""
    code = 1
    try:
        namespaces.libc_call("prctl", namespaces.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # B, its init
        os.environ[protocol.PROGRESS_FD] = str(PROGRESS_FD_NUMBER)
        from workers import job_process

        code = job_process.main(plan.command[2:])
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.write(2, f"bwrap: {error}\n".encode(errors="replace")[:500])
    os._exit(code)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]))
