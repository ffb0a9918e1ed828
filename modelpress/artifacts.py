"""Export-target artifacts as files the job's process left: opened without following links, measured
and published as the very inode that was checked.

The job's process is untrusted (it runs the uploaded model), so ``output/model.onnx`` may be a
symbolic link to a host file, a FIFO, or be swapped between a check and its use. Each artifact is
opened once with ``O_NOFOLLOW`` (a link fails the open) and checked to be a regular file on the
open descriptor; what is hashed and what is published are that descriptor's inode.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


class NotPlainFile(ValueError):
    """The artifact is missing, a link or something other than a regular file; the message says which."""


@contextlib.contextmanager
def opened_plain(path: Path) -> Iterator[BinaryIO]:
    """``path`` open for reading, when it is a regular file and not a symbolic link (else ``NotPlainFile``)."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotPlainFile(f"output/{path.name} does not exist") from None
    except OSError as error:  # ELOOP: a symbolic link
        raise NotPlainFile(f"output/{path.name} is not a plain file ({error.strerror or error})") from None
    handle = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotPlainFile(f"output/{path.name} is not a plain file")
        yield handle
    finally:
        handle.close()


def measure(handle: BinaryIO) -> tuple[int, str]:
    """Bytes and SHA-256 of an open file, read from its start."""
    handle.seek(0)
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file the service itself wrote or already checked (links followed)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def link_opened(handle: BinaryIO, source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``, and keep the link only if it names the inode ``handle`` has open
    (``source`` may have been swapped since it was opened). No link is followed."""
    target.unlink(missing_ok=True)
    os.link(source, target, follow_symlinks=False)
    opened, linked = os.fstat(handle.fileno()), os.lstat(target)
    if (opened.st_dev, opened.st_ino) != (linked.st_dev, linked.st_ino):
        target.unlink(missing_ok=True)
        raise NotPlainFile(f"output/{source.name} changed while it was published")
