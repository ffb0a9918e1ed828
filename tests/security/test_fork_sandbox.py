"""The fork server (workers/fork_sandbox.py): a warm job process forked from a process that imported torch
once, which builds bubblewrap's sandbox itself from bubblewrap's own command line.

The attacks of tests/e2e/test_sandbox.py run against such processes (the default); here: what a fork
refuses to build, and a real fork's confinement seen from outside, beside the server it came from.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from modelpress.storage import JobFiles
from tests.conftest import make_settings
from workers import fork_sandbox, job_protocol, sandbox, seccomp, warm_sandbox
from workers.namespaces import Plan, SetupError


def _command(tmp_path: Path, seccomp_fd: int = 9) -> tuple[list[str], JobFiles]:
    settings = make_settings(tmp_path / "data", redis_url=None)
    files = JobFiles(tmp_path / "warm" / "job")
    argv = [*job_protocol.JOB_PROCESS, "--warm", str(files.root)]
    return sandbox.job_command(settings, files, argv, seccomp_fd=seccomp_fd, devices=[]), files


def test_a_plan_is_the_command_line_bubblewrap_would_get(tmp_path: Path) -> None:
    command, files = _command(tmp_path)
    plan = Plan.parse(command)
    assert (plan.uid, plan.gid, plan.hostname, plan.chdir) == (65534, 65534, "modelpress-job", str(files.root))
    assert plan.command == command[command.index("--") + 1 :]
    assert [mount[0] for mount in plan.mounts[:3]] == ["--proc", "--dev", "--tmpfs"]
    settings = make_settings(tmp_path / "data", redis_url=None)
    assert plan.mounts[2] == ("--tmpfs", str(settings.job_memory_mb << 20), "/tmp")  # the sized private /tmp
    assert plan.mounts[-2:] == [
        ("--ro-bind", str(files.root), str(files.root)),
        ("--bind", str(files.output_model.parent), str(files.output_model.parent)),
    ]


def _without(command: list[str], option: str, values: int) -> list[str]:
    at = command.index(option)
    return command[:at] + command[at + 1 + values :]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: _without(c, "--seccomp", 1), "lacks --seccomp"),
        (lambda c: _without(c, "--unshare-net", 0), "lacks --unshare-net"),
        (lambda c: _without(c, "--disable-userns", 0), "lacks --disable-userns"),
        (lambda c: [c[0], "--setenv", "A", "B", *c[1:]], "unknown option --setenv"),
        (lambda c: [*c[: c.index("--cap-drop") + 1], "CAP_KILL", *c[c.index("--cap-drop") + 2 :]], "--cap-drop ALL"),
        (lambda c: [*c[: c.index("--") + 1], "/bin/sh", "-c", "id"], "runs only this interpreter"),
        (lambda c: [*c[: c.index("--") + 1], sys.executable, "-c", "print()"], "runs only a waiting job process"),
        (lambda c: [*c[: c.index("--tmpfs")], "/tmp", *c[c.index("--tmpfs") :]], "--size must be followed by"),
        (lambda c: [*c[: c.index("--ro-bind") + 1], "/usr", "usr", *c[c.index("--ro-bind") + 1 :]], "not absolute"),
    ],
)
def test_a_command_it_cannot_build_as_bubblewrap_would_is_refused(tmp_path: Path, change, reason) -> None:
    command, _ = _command(tmp_path)
    with pytest.raises(SetupError, match=reason):
        Plan.parse(change(command))
    Plan.parse(command)  # positive control: the unchanged command is accepted


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fork_sandbox.ForkServer]:
    settings = make_settings(tmp_path_factory.mktemp("forks") / "data", redis_url=None)
    key = warm_sandbox._key(settings, job_protocol.JOB_PROCESS)
    forks = fork_sandbox.ForkServer(settings, key, str(warm_sandbox.PROJECT_ROOT))
    try:
        yield forks
    finally:
        forks.close()


def test_the_server_refuses_a_command_without_the_filter_and_a_fork_it_builds_is_confined(
    server: fork_sandbox.ForkServer, tmp_path: Path
) -> None:
    program = seccomp.program_fd()
    command, files = _command(tmp_path, seccomp_fd=program)
    files.root.mkdir(parents=True, exist_ok=True)
    handover_read, handover_write = os.pipe()
    log_read, log_write = os.pipe()
    progress_read, progress_write = os.pipe()
    try:
        with pytest.raises(OSError, match="refused: the command lacks --seccomp"):
            server.spawn(_without(command, "--seccomp", 1), handover_read, log_write, progress_write, program)

        forked = server.spawn(command, handover_read, log_write, progress_write, program)  # positive control
        for fd in (handover_read, log_write, progress_write, program):
            os.close(fd)
        assert warm_sandbox._await_warm(progress_read, 60), os.read(log_read, 4096)
        job = _only_child(forked.pid)
        status = _status(job)
        # Seen from outside: its own PID, mount, network and user namespaces, no capability, the filter on.
        for kind in ("pid", "mnt", "net", "user", "ipc", "uts"):
            assert os.readlink(f"/proc/{job}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
            assert os.readlink(f"/proc/{job}/ns/{kind}") != os.readlink(f"/proc/{server.process.pid}/ns/{kind}")
        assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == ("0" * 16,) * 3
        assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
        assert status["NSpid"].split()[-1] == "2"  # PID 2 of its own namespace: its init, not the job, is PID 1
        init = _status(psutil.Process(job).ppid())
        assert init["NSpid"].split()[-1] == "1" and init["CapEff"] == "0" * 16 and init["Seccomp"] == "2"
        # Its root is a tree of its own: the data directory and the project root are not in it.
        assert not os.path.exists(f"/proc/{job}/root{tmp_path / 'data'}")
        assert os.path.isdir(f"/proc/{job}/root{files.root}")
        # The server's other descriptors did not follow it: its pipes and the filter's pipe only.
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{job}/fd")) == [0, 1, 2, 3]

        forked.stop()  # as the supervisor stops a job: the monitor, through its pidfd
        assert forked.wait(30) in (-signal.SIGKILL, 128 + signal.SIGKILL)
        # The job went with it, whatever its process group: the kernel ends a PID namespace with its init.
        deadline = time.monotonic() + 30
        while psutil.pid_exists(job) and psutil.Process(job).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the job outlived its stopped sandbox"
            time.sleep(0.05)
    finally:
        for fd in (handover_write, log_read, progress_read):
            os.close(fd)


def _only_child(pid: int) -> int:
    """The job's process under the monitor ``pid``: monitor -> the sandbox's init -> the job."""
    (init,) = psutil.Process(pid).children()
    deadline = time.monotonic() + 30
    while init.cmdline()[1:4] != ["-I", "-S", "-c"]:  # a small init, not a copy of the server (once it has exec-ed)
        assert time.monotonic() < deadline, init.cmdline()
        time.sleep(0.05)
    (job,) = init.children()
    assert job.cmdline()[1:3] == ["-m", "workers.fork_sandbox"]  # the server's copy, not a new Python
    return job.pid


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}
