"""The embedded Redis is the stack's alone, and `make run` never attaches to a server it did not start.

One stack runs as `make run` runs it (``python -m modelpress.stack``), over a data directory an
older version left readable to all. Each test attacks as a local process would, and shows the
stack's own clients doing the same thing where they may.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis
import requests
import torch

from modelpress.stack import PROJECT_ROOT, PortHeld, Stack, free_port, redis_is_ours, redis_server_executable
from tests.conftest import make_settings
from tests.models import SmallConvNet, scripted_bytes

QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
SEEDED_PASSWORD = "a1" * 32  # what an older version left in the data directory, mode 0644


@dataclass
class RunningStack:
    process: subprocess.Popen
    base: str
    data: Path
    output: Path
    redis_port: int

    @property
    def password(self) -> str:
        return (self.data / "redis-password").read_text().strip()

    def redis_process(self) -> psutil.Process:
        return next(
            child
            for child in psutil.Process(self.process.pid).children(recursive=True)
            if child.name().startswith("redis-server")
        )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, password=self.password, socket_timeout=5)


def _stack_env(data: Path, port: int, redis_port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "MODELPRESS_DATA_DIR": str(data),
        "MODELPRESS_PORT": str(port),
        "MODELPRESS_REDIS_PORT": str(redis_port),
        "MODELPRESS_MAX_UPLOAD_MB": "64",
        "MODELPRESS_JOB_THREADS": "1",
        "MODELPRESS_API_WORKERS": "1",
    }
    env.pop("REDIS_URL", None)
    env.pop("MODELPRESS_REDIS_URL", None)
    return env


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    root = tmp_path_factory.mktemp("private-redis")
    data = root / "data"
    (data / "redis").mkdir(parents=True)
    os.chmod(data / "redis", 0o755)
    for path, text in ((data / "redis-password", SEEDED_PASSWORD), (data / "redis" / "dump.rdb", "")):
        path.write_text(text)
        os.chmod(path, 0o644)
    assert stat.S_IMODE((data / "redis-password").stat().st_mode) == 0o644  # the wide modes the start must narrow
    port, redis_port = free_port(), free_port()
    output = root / "stack.log"
    with open(output, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelpress.stack"],
            cwd=PROJECT_ROOT,
            env=_stack_env(data, port, redis_port),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack = RunningStack(process, f"http://127.0.0.1:{port}", data, output, redis_port)
    try:
        deadline = time.monotonic() + 180
        while "is up at" not in output.read_text():
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.3)
        yield stack
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def _raw(port: int, *commands: bytes) -> list[bytes]:
    """Each command's first reply line, from a client that never authenticates."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        reader = connection.makefile("rb")
        for command in commands:
            connection.sendall(command + b"\r\n")
            replies.append(reader.readline().strip())
    return replies


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------- the server is private


def test_the_files_of_the_embedded_redis_are_its_owners_alone(running: RunningStack) -> None:
    assert running.password == SEEDED_PASSWORD  # kept, not remade: every process reads the same one
    assert _mode(running.data / "redis-password") == 0o600  # narrowed from 0644
    assert _mode(running.data / "redis") == 0o700  # narrowed from 0755
    assert _mode(running.data / "redis" / "dump.rdb") == 0o600  # an older file, narrowed
    assert (running.data / "redis" / "appendonly.aof").exists()
    assert _mode(running.data / "redis" / "appendonly.aof") == 0o600  # made by Redis under umask 077
    assert _mode(running.data / "redis" / "redis.conf") == 0o600
    assert SEEDED_PASSWORD not in (running.data / "redis" / "redis.conf").read_text()  # its SHA-256 only


def test_redis_refuses_a_client_without_the_password(running: RunningStack) -> None:
    running.client().hset("mp:job:probe", "tenant", "alpha")

    replies = _raw(
        running.redis_port,
        b"HGET mp:job:probe tenant",
        b"KEYS *",
        b"HSET mp:job:probe tenant beta",
        b"AUTH not-the-password",
    )

    assert [reply.split()[0] for reply in replies] == [b"-NOAUTH"] * 3 + [b"-WRONGPASS"]
    assert running.client().hget("mp:job:probe", "tenant") == b"alpha"  # the record was not rewritten
    # Positive control: the stack's own clients hold the password (the worker answered over Redis).
    assert _raw(running.redis_port, f"AUTH {running.password}".encode(), b"PING") == [b"+OK", b"+PONG"]
    deadline = time.monotonic() + 120  # the worker answers once it has started and tested its sandbox
    while (ready := requests.get(running.base + "/readyz", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.5)
    assert ready.json()["redis"] == "ok" and ready.json()["workers"] == 1, ready.text


def test_administration_commands_are_refused_even_with_the_password(running: RunningStack, tmp_path: Path) -> None:
    client = running.client()
    client.set("mp:probe", "kept")
    target = tmp_path / "written-by-redis"
    target.mkdir()
    refused = {}
    for command in (
        ["CONFIG", "SET", "dir", str(target)],
        ["CONFIG", "SET", "dbfilename", "planted"],
        ["SAVE"],
        ["BGSAVE"],
        ["BGREWRITEAOF"],
        ["FLUSHALL"],
        ["FLUSHDB"],
        ["DEBUG", "SLEEP", "0"],
        ["MODULE", "LOAD", "/tmp/x.so"],
        ["SHUTDOWN", "NOSAVE"],
        ["REPLICAOF", "127.0.0.1", "1"],
        ["SLAVEOF", "127.0.0.1", "1"],
        ["ACL", "SETUSER", "default", "nopass"],
        ["MONITOR"],
        ["MIGRATE", "127.0.0.1", "1", "mp:probe", "0", "1000"],
        ["CLIENT", "KILL", "TYPE", "normal"],
        ["SWAPDB", "0", "1"],
        ["EVAL", "return redis.call('flushall')", "0"],
    ):
        try:
            client.execute_command(*command)
        except redis.ResponseError as error:
            refused[command[0]] = str(error)
    assert set(refused) == {
        "CONFIG",
        "SAVE",
        "BGSAVE",
        "BGREWRITEAOF",
        "FLUSHALL",
        "FLUSHDB",
        "DEBUG",
        "MODULE",
        "SHUTDOWN",
        "REPLICAOF",
        "SLAVEOF",
        "ACL",
        "MONITOR",
        "MIGRATE",
        "CLIENT",
        "SWAPDB",
        "EVAL",
    }
    assert all("no permissions" in reason for name, reason in refused.items() if name != "EVAL"), refused
    assert list(target.iterdir()) == []  # nothing was written where CONFIG SET dir pointed
    assert client.get("mp:probe") == b"kept" and running.redis_process().is_running()
    # Positive control: what the service uses works with the same client.
    assert client.info("server")["process_id"] == running.redis_process().pid
    assert client.eval("return redis.call('get', KEYS[1])", 1, "mp:probe") == b"kept"


def test_jobs_run_and_the_password_is_never_logged_nor_on_a_command_line(running: RunningStack) -> None:
    torch.manual_seed(0)
    submitted = requests.post(
        running.base + "/v1/jobs",
        files={"model": ("m.pt", scripted_bytes(SmallConvNet()))},
        data={"spec": json.dumps(QUICK)},
        timeout=60,
    )
    assert submitted.status_code == 202, submitted.text
    deadline = time.monotonic() + 180
    while (job := requests.get(f"{running.base}/v1/jobs/{submitted.json()['id']}", timeout=10).json())["state"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["state"] == "succeeded", job["error"]  # Celery, kombu and the job store work under the ACL

    output = running.output.read_text()
    assert f"redis://:***@127.0.0.1:{running.redis_port}/0" in output  # the "is up" line, masked
    assert running.password not in output
    tree = [psutil.Process(running.process.pid), *psutil.Process(running.process.pid).children(recursive=True)]
    assert len(tree) >= 4  # the stack, Redis, the worker and the API at least
    assert not [process.cmdline() for process in tree if running.password in " ".join(process.cmdline())]


# ----------------------------------------------------------------------------- held ports


def _listening_socket() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def _foreign_redis(port: int, directory: Path, *options: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            redis_server_executable(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return process
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "the foreign redis-server did not start"
        time.sleep(0.1)


def test_a_held_redis_port_stops_the_start_at_once_naming_it(tmp_path: Path) -> None:
    holder, port = _listening_socket()
    stack = Stack(make_settings(tmp_path / "data", redis_url=None, redis_port=port), log_dir=tmp_path / "logs")
    try:
        with pytest.raises(PortHeld) as held:
            stack.start()
        assert f"port {port} on 127.0.0.1 is already in use" in str(held.value)
        assert "MODELPRESS_REDIS_PORT" in str(held.value)
        assert stack.processes == {}  # nothing was started
    finally:
        stack.stop()
        holder.close()


def test_a_foreign_redis_on_the_port_is_never_used(tmp_path: Path) -> None:
    port = free_port()
    foreign = _foreign_redis(port, tmp_path)
    other_service = redis.Redis(port=port)
    other_service.lpush("their-queue", "their job")
    stack = Stack(make_settings(tmp_path / "data", redis_url=None, redis_port=port), log_dir=tmp_path / "logs")
    try:
        with pytest.raises(PortHeld, match=f"port {port} .*MODELPRESS_REDIS_PORT"):
            stack.start()
        assert stack.processes == {}
        assert other_service.keys("*") == [b"their-queue"]  # no worker took their job, no record was written
        assert other_service.lrange("their-queue", 0, -1) == [b"their job"]
    finally:
        stack.stop()
        foreign.terminate()
        foreign.wait(10)


def test_a_held_api_port_stops_the_start_before_anything_runs(tmp_path: Path) -> None:
    holder, port = _listening_socket()
    stack = Stack(make_settings(tmp_path / "data", redis_url=None, port=port), log_dir=tmp_path / "logs")
    try:
        with pytest.raises(PortHeld, match=f"port {port} .*MODELPRESS_PORT"):
            stack.start()
        assert stack.processes == {}  # not even Redis
    finally:
        stack.stop()
        holder.close()


def test_make_run_with_a_held_port_exits_with_the_message_and_no_traceback(tmp_path: Path) -> None:
    holder, port = _listening_socket()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "modelpress.stack"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=_stack_env(tmp_path / "data", free_port(), port),
        )
    finally:
        holder.close()
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"port {port} on 127.0.0.1 is already in use" in output and "MODELPRESS_REDIS_PORT" in output
    assert "Traceback" not in output


def test_readiness_takes_only_the_redis_process_it_started(tmp_path: Path) -> None:
    """Past the port check (a server that took the port in between): only our process, with our password, counts."""
    password = "b2" * 32
    same_port, no_port = free_port(), free_port()
    same_password = _foreign_redis(same_port, tmp_path, "--requirepass", password)
    no_password = _foreign_redis(no_port, tmp_path)
    try:
        assert not redis_is_ours(same_port, password, os.getpid())  # the password agrees, the process does not
        assert not redis_is_ours(no_port, password, no_password.pid)  # the process agrees, no password is asked
        assert not redis_is_ours(same_port, "wrong", same_password.pid)
        assert redis_is_ours(same_port, password, same_password.pid)  # positive control: both agree
    finally:
        for process in (same_password, no_password):
            process.terminate()
            process.wait(10)
