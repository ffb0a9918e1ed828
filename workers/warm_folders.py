"""The folders of pre-started sandboxes (``workers.warm_sandbox``): made, owned, removed and swept.

``<data dir>/warm/<host>-<pid>-<random>/``: ``job/`` (bound read-only as the process's job folder),
``output/`` (bound as its ``output/``, renamed to the job's at the hand-over), ``job-id`` (the job it
serves), ``owner.lock`` (``flock``-ed by the worker process that made it, for as long as it is in use).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

WARM_DIR = "warm"  # under the data directory: beside jobs/, so links and renames stay on one filesystem
JOB_LABEL = "job-id"  # <name>/job-id: which job a warm folder serves (for operators and the tests)
# <name>/owner.lock: flock-ed by the worker process that made the folder for as long as the folder is
# in use. A folder whose lock anyone can take is left over (its worker was killed) and is swept,
# whatever its name says: a PID in a name can be reused; a lock dies with its holder.
OWNER_LOCK = "owner.lock"
UNLOCKED_GRACE_S = 60.0  # a folder without its lock file yet is being made: swept only when this old


def made_and_owned(parent: Path) -> tuple[Path, int]:
    """A new warm folder, locked as in use by this process (``OWNER_LOCK``; the descriptor is not
    inherited). Made and locked under a name ``sweep`` does not match, then renamed into place: a sweep
    never sees it unlocked (it would take the free lock between create and flock, and remove it)."""
    name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}"
    parent.mkdir(parents=True, exist_ok=True)
    making = parent / f".making-{name}"
    making.mkdir()
    try:
        fd = os.open(making / OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except BaseException:
        shutil.rmtree(making, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else holds it
        os.rename(making, parent / name)  # the lock is the file's: it holds across the rename
    except BaseException:
        remove(making, fd)
        raise
    return parent / name, fd


def remove(folder: Path, owner_fd: int) -> None:
    """The folder first, then its lock: a sweep never sees it unlocked while it still holds a job's files."""
    shutil.rmtree(folder, ignore_errors=True)
    if owner_fd >= 0:
        os.close(owner_fd)


def sweep(data_dir: Path) -> list[Path]:
    """Remove this host's warm folders that no live worker process holds (their worker was killed:
    nothing else removes them, and a taken one holds hard links of a job's inputs). Run by each
    starter when it begins and by the reaper at each pass; returns the folders removed."""
    removed = []
    for making in (data_dir / WARM_DIR).glob(f".making-{socket.gethostname()}-*"):  # its maker died at once
        with contextlib.suppress(FileNotFoundError):
            if time.time() - making.stat().st_mtime > UNLOCKED_GRACE_S:
                shutil.rmtree(making, ignore_errors=True)
                removed.append(making)
    for folder in (data_dir / WARM_DIR).glob(f"{socket.gethostname()}-*"):
        try:
            fd = os.open(folder / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):  # being made now, or made before the lock existed
                if time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its worker process holds it
        finally:
            os.close(fd)  # (releases the lock just taken, if it was)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
