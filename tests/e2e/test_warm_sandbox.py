"""The pre-warmed sandbox (workers/warm_sandbox.py) through the real stack: real Redis, Celery worker,
bubblewrap. A job's process may be started before its job, but is used for that one job only.

The stack runs with ``MODELPRESS_OP_CHECK=off`` so a model can write a marker file into its ``/tmp``
(``torch.from_file(..., shared=True)`` creates it); only the sandbox stands between jobs then.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from modelpress.stack import Stack
from tests.conftest import ApiClient, make_settings, warm_processes
from tests.models import SmallConvNet, save_scripted

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
MARK = 7


class TmpMarker(nn.Module):
    """Writes ``MARK`` into ``path`` (created in the job's /tmp) and keeps what it reads back from it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("seen", torch.zeros(8, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.path, True, 8, dtype=torch.uint8).fill_(7)  # MARK; used below, or
        self.seen.copy_(torch.from_file(self.path, False, 8, dtype=torch.uint8))  # TorchScript drops the write
        return self.conv(x) + written.float().sum() * 0.0


@pytest.fixture(scope="module")
def warm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("warm")
    stack = Stack(
        make_settings(root / "data", redis_url=None, op_check="off", warm_sandbox=True), log_dir=root / "logs"
    )
    try:
        yield stack.start()
    finally:
        stack.stop()


def test_two_consecutive_jobs_share_no_process_pid_namespace_or_tmp(warm_stack: Stack, tmp_path: Path) -> None:
    client = ApiClient(warm_stack.base_url)
    marker = f"/tmp/marker-{secrets.token_hex(4)}"
    model = save_scripted(TmpMarker(marker), tmp_path / "marker.pt")

    first_process = _waiting(warm_stack)
    first, first_report = _job(client, model)
    # The first job really left its marker in its /tmp: what it read back from the file is in its model.
    served = client.session.get(client.url(first["links"]["model"]), headers={"Accept-Encoding": "identity"})
    assert torch.jit.load(io.BytesIO(served.content)).seen.tolist() == [MARK] * 8
    assert first_report["sandbox"]["start"] == "warm"  # positive control: the pre-started process served it
    assert first_report["sandbox"]["started_by"] == "fork server"  # forked from one that imported torch once
    _gone(first_process)  # used once: it ended with its job

    second_process = _waiting(warm_stack)  # its successor, started after the first job
    assert second_process.pid != first_process.pid
    _, second_report = _job(client, model)

    assert second_report["sandbox"]["start"] == "warm"
    # Distinct PID namespaces: distinct processes (a process never changes its namespace) and sandboxes.
    assert first_report["sandbox"]["pid_namespace"].startswith("pid:[")
    assert second_report["sandbox"]["pid_namespace"] != first_report["sandbox"]["pid_namespace"]
    assert first_report["sandbox"]["tmp_entries"] == 0
    assert second_report["sandbox"]["tmp_entries"] == 0  # the first job's marker is not in the second's /tmp
    _gone(second_process)
    for report in (first_report, second_report):
        assert report["timings_s"]["startup"] >= 0 and {"load", "measure", "startup"} <= set(report["timings_s"])


def test_a_warm_process_killed_while_idle_is_replaced_and_the_next_job_succeeds(
    warm_stack: Stack, tmp_path: Path
) -> None:
    client = ApiClient(warm_stack.base_url)
    model = save_scripted(TmpMarker(f"/tmp/marker-{secrets.token_hex(4)}"), tmp_path / "marker.pt")
    victim = _waiting(warm_stack)
    os.kill(victim.pid, signal.SIGKILL)
    _gone(victim)  # the kill struck

    _, report = _job(client, model)
    assert report["sandbox"]["start"] == "cold"  # the dead one was not handed the job: it started its own
    assert report["timings_s"]["startup"] > 0

    replacement = _waiting(warm_stack)
    assert replacement.pid != victim.pid
    _, after = _job(client, model)
    assert after["sandbox"]["start"] == "warm"


def test_a_killed_worker_process_takes_its_warm_process_along_and_its_folder_is_swept(warm_stack: Stack) -> None:
    waiting = _waiting(warm_stack)
    folder = Path(waiting.cmdline()[-1]).parent
    assert folder.is_dir()
    # Its parents: the fork server (workers/fork_sandbox.py), then the pool process that started it.
    pool_process = next(p for p in waiting.parents() if "workers.fork_sandbox" not in p.cmdline())
    assert "celery" in " ".join(pool_process.cmdline())
    pool_process.kill()  # SIGKILL: nothing of it runs again, only the kernel's parent-death signal acts

    _gone(waiting)
    successor = _waiting(warm_stack)  # Celery starts a new pool process, which starts a new one
    assert successor.pid != waiting.pid
    _until(lambda: not folder.exists(), "the dead process's warm folder was not swept")


def test_with_the_setting_off_jobs_start_cold(tmp_path: Path) -> None:
    stack = Stack(make_settings(tmp_path / "data", redis_url=None, warm_sandbox=False), log_dir=tmp_path / "logs")
    try:
        stack.start()
        client = ApiClient(stack.base_url)
        plain = save_scripted(SmallConvNet(), tmp_path / "plain.pt")
        for _ in range(2):
            _, report = _job(client, plain)
            assert report["sandbox"]["start"] == "cold"
            assert report["timings_s"]["startup"] > 0
        assert warm_processes(stack.settings.data_dir) == []
    finally:
        stack.stop()


def _job(client: ApiClient, model: Path) -> tuple[dict, dict]:
    response = client.submit(model, SPEC)
    assert response.status_code == 202, response.text
    job = client.wait(response.json()["id"], timeout=240)
    assert job["state"] == "succeeded", job.get("error")
    return job, client.session.get(client.url(job["links"]["report"])).json()


def _waiting(stack: Stack) -> psutil.Process:
    """The one pre-started process waiting under this stack's data directory (polled, bounded)."""
    found: list[psutil.Process] = []

    def one() -> bool:
        found[:] = warm_processes(stack.settings.data_dir)
        return len(found) == 1

    _until(one, "no pre-started job process is waiting")
    return found[0]


def _gone(process: psutil.Process) -> None:
    def ended() -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    _until(ended, f"process {process.pid} is still running")


def _until(condition, message: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.1)


def test_stopping_the_worker_leaves_no_warm_process(warm_stack: Stack) -> None:
    """Last of this module's stack: a worker stopped as an operator stops it takes its waiting processes along."""
    waiting = _waiting(warm_stack)
    folder = Path(waiting.cmdline()[-1]).parent
    assert folder.is_dir()
    warm_stack.stop_process("worker")

    _gone(waiting)
    assert warm_processes(warm_stack.settings.data_dir) == []
    assert not folder.exists()  # removed by its pool process as it stopped, not left for the next start


def test_a_discarded_process_pipe_is_not_closed_under_the_thread_still_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that stops waiting for a process still importing discards it while the starter thread
    reads its pipe: closing the descriptor then let that thread read a cold job's pipe that reused the
    number (found by a red team). Here the pipe's other end stays open, so the read cannot end."""
    import subprocess
    import threading

    from workers import warm_sandbox

    monkeypatch.setattr(warm_sandbox, "DISCARD_WAIT_S", 0.5, raising=False)
    progress_read, progress_write = os.pipe()
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    folder = tmp_path / "warm-folder"
    folder.mkdir()
    waiting = warm_sandbox._Waiting(child, folder, (), progress_read, os.open(os.devnull, os.O_RDONLY), -1, -1)
    seen: dict[str, object] = {}

    def starter() -> None:  # what _start does with a published process
        seen["warm"] = warm_sandbox._await_warm(progress_read, 30)
        seen["open_after_read"] = os.fstat(progress_read) is not None
        waiting.failed = not seen["warm"]
        waiting.ready.set()

    reader = threading.Thread(target=starter)
    reader.start()
    try:
        warm_sandbox._discard(waiting)
        assert child.poll() is not None  # the discard struck: the process is dead
        assert reader.is_alive()  # and the starter is still reading (its pipe's writer lives on)
        os.fstat(progress_read)  # positive: the descriptor under the reader is still this pipe
        assert not folder.exists()
    finally:
        os.close(progress_write)  # the read ends
        reader.join(10)
    assert seen == {"warm": False, "open_after_read": True}
    os.close(progress_read)


def test_a_sweep_removes_the_folders_no_live_worker_holds_whatever_pid_their_name_gives(tmp_path: Path) -> None:
    """A warm folder taken by a job holds hard links of its inputs; its worker killed, nothing else
    removes it. Liveness is its owner's lock, not the PID in its name: a PID is reused (found by a
    red team: the name-only sweep kept a dead worker's folder while any process had that PID)."""
    import socket
    import subprocess
    import sys

    from workers import warm_folders

    warm, host = tmp_path / warm_folders.WARM_DIR, socket.gethostname()

    def folder(name: str, locked: bool = True) -> Path:
        made = warm / name
        (made / "job" / "input").mkdir(parents=True)
        (made / "job" / "input" / "model.pt").write_bytes(b"a tenant's model")
        if locked:
            (made / warm_folders.OWNER_LOCK).touch()
        return made

    reused = folder(f"{host}-{os.getppid()}-dead")  # a killed worker's; its PID now a live process's
    held = folder(f"{host}-{os.getppid()}-live")  # a live worker's: its lock is held (positive control)
    young = folder(f"{host}-1-making", locked=False)  # being made: no lock file yet
    old = folder(f"{host}-1-unlocked", locked=False)
    os.utime(old, (time.time() - 2 * warm_folders.UNLOCKED_GRACE_S,) * 2)
    elsewhere = folder("another-host-1-dead")  # another host's: its own workers sweep it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX);"
            " print('held', flush=True); sys.stdin.read()",
            str(held / warm_folders.OWNER_LOCK),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        assert sorted(warm_folders.sweep(tmp_path)) == sorted([reused, old])
        assert not reused.exists() and not old.exists()
        assert held.is_dir() and young.is_dir() and elsewhere.is_dir()
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert warm_folders.sweep(tmp_path) == [held]  # its holder gone, its folder goes too


def test_when_no_fork_can_be_had_the_warm_process_is_started_by_bubblewrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fork server's fallback: a fork refused (here: every spawn fails) leaves warm processes to
    bubblewrap, for good and said once, and the process it starts is as warm as a forked one."""
    from workers import fork_sandbox, warm_sandbox

    def refused(*args, **kwargs):
        raise OSError("the fork server refused: a test says so")

    monkeypatch.setattr(fork_sandbox.ForkServer, "spawn", refused)
    settings = make_settings(tmp_path / "data", redis_url=None)
    pool = warm_sandbox.WarmSandbox()
    try:
        with caplog.at_level("WARNING", logger="modelpress.worker"):
            pool.prepare(settings)
            _until(lambda: pool._waiting is not None and pool._waiting.ready.is_set(), "no process became warm")
        waiting = pool._waiting
        assert not waiting.forked and not waiting.failed  # started by bubblewrap, and it said warm
        assert psutil.Process(waiting.child.pid).cmdline()[0].endswith("bwrap")
        assert "started with bubblewrap from now on: a fork could not be had" in caplog.text
        assert pool._forks_broken is not None and pool._forks is None  # the server was retired, not retried
    finally:
        pool.close()
