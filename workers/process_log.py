"""A job's ``process.log``: what its child prints, of which only the tail is kept.

The child's stdout and stderr are a pipe that a supervisor thread copies into the file. A model
may print without end (TorchScript's ``print`` needs no file access), so the file is cut back to
its last ``MAX_BYTES`` whenever it reaches twice that, with one line saying how much was dropped:
the host never holds more than ``2 * MAX_BYTES`` of it, and after the job at most ``MAX_BYTES``
plus that line. The tail is what says why a job died (a traceback, bubblewrap's complaint).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

MAX_BYTES = 1 << 20
_CHUNK = 64 << 10


class ProcessLog:
    """Copies ``read_fd`` (the child's output) into ``path`` on a thread, keeping the tail."""

    def __init__(self, read_fd: int, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.received_bytes = 0
        self.dropped_bytes = 0
        self._read_fd = read_fd
        self._thread = threading.Thread(target=self._copy, name=f"process-log-{path.parent.name}", daemon=True)

    def start(self) -> ProcessLog:
        self._thread.start()
        return self

    def finish(self, timeout: float = 5.0) -> None:
        """Wait for the end of the child's output (every process of the job has exited or been killed)."""
        self._thread.join(timeout)

    def _copy(self) -> None:
        with os.fdopen(self._read_fd, "rb", buffering=0) as pipe, open(self.path, "ab") as log:
            while True:
                chunk = pipe.read(_CHUNK)
                if not chunk:
                    break
                self.received_bytes += len(chunk)
                log.write(chunk)
                if log.tell() >= 2 * self.max_bytes:
                    self._keep_tail(log)
            if log.tell() > self.max_bytes + 200:
                self._keep_tail(log)

    def _keep_tail(self, log) -> None:
        """Rewrite the file as one line of what was dropped, then its last ``max_bytes``."""
        log.flush()
        size = log.tell()
        with open(self.path, "r+b") as handle:
            handle.seek(size - self.max_bytes)
            tail = handle.read(self.max_bytes)
            self.dropped_bytes += size - self.max_bytes
            marker = (
                f"[modelpress: {self.dropped_bytes} bytes of earlier output dropped; "
                f"the last {self.max_bytes} bytes are kept]\n"
            ).encode()
            handle.seek(0)
            handle.write(marker + tail)
            handle.truncate()
        log.seek(0, os.SEEK_END)
