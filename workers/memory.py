"""The job's memory and output limits: the supervisor watches its job's process tree and files.

``RLIMIT_AS`` counted address space, of which importing torch alone maps about 3.3 GB, so a
limit of 8 GB left room for a model of barely 1 GB. What a job really costs the machine is the
resident memory of its processes, so that is what is limited: a thread samples the resident
set of every process of the job (bubblewrap and the job process inside it) every
``SAMPLE_INTERVAL_S`` and kills the job's process group the moment the sum exceeds the limit.
The supervisor then fails the job with the out-of-memory reason. A cgroup would stop the
allocation itself rather than a sample after it; this one works without cgroup delegation,
which containers often lack (see docs/architecture.md, "Memory for big models"). The job process
keeps a loose address-space cap as a backstop against one huge allocation between two samples.

Memory that is not resident in any process counts too: files in the sandbox's own tmpfs mounts
(``/tmp`` and ``/dev``, seen from outside through ``/proc/<pid>/root``, which the worker's user
may read for its own sandbox) and memory files (``memfd_create``, seen as ``/memfd:`` entries
in ``/proc/<pid>/fd``). Pages of such a file that a process maps are counted twice, once as
resident memory: the watch errs on the side of the machine.

The same thread bounds ``output/`` (the one folder the job writes on the host's disk): its
files' sizes and its number of entries.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

SAMPLE_INTERVAL_S = 0.05  # at memset speed (a few GB/s) a job can overshoot by a few hundred MB
TREE_REFRESH_S = 1.0  # how often the list of the job's processes is walked again (it rarely changes)
_SANDBOX_MOUNTS = ("tmp", "dev")  # the tmpfs mounts of the sandbox (workers/sandbox.py) a job can fill


class MemoryWatch:
    """Samples the memory of the process tree rooted at ``pid`` (resident, plus its tmpfs and memory
    files) and the size of ``output_dir``; calls ``kill`` once either is over its limit."""

    def __init__(
        self,
        pid: int,
        limit_bytes: int,
        kill: Callable[[], None],
        output_dir: Path | None = None,
        output_limit_bytes: int = 0,
        output_entries: int = 0,
    ) -> None:
        self.limit_bytes = limit_bytes
        self.peak_bytes = 0
        self.exceeded = False
        self.output_limit_bytes = output_limit_bytes
        self.output_bytes = 0
        self.output_entries = 0
        self.output_exceeded = False
        self._output_dir = output_dir
        self._max_entries = output_entries
        self._kill = kill
        self._stop = threading.Event()
        # The host's own filesystems: while bubblewrap sets the sandbox up, its processes still see them
        # through /proc/<pid>/root, and their usage is not the job's.
        self._host_devices = {
            os.stat(path).st_dev for path in ("/", "/tmp", "/dev", "/dev/shm") if os.path.exists(path)
        }
        try:
            self._root: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:
            self._root = None
        self._thread = threading.Thread(target=self._run, name=f"memory-watch-{pid}", daemon=True)

    def start(self) -> MemoryWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def check_output(self) -> bool:
        """Measure ``output/`` now; True (and ``output_exceeded``) when it is over its bounds. Reaching
        the limit counts: the job's RLIMIT_FSIZE stops a file exactly there."""
        if self._output_dir is None:
            return False
        self.output_bytes, self.output_entries = _folder_size(self._output_dir, self._max_entries + 1)
        if self.output_bytes >= self.output_limit_bytes or self.output_entries > self._max_entries:
            self.output_exceeded = True
        return self.output_exceeded

    def _run(self) -> None:
        if self._root is None:
            return
        processes: list[psutil.Process] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed >= TREE_REFRESH_S:
                try:
                    processes = [self._root, *self._root.children(recursive=True)]
                except psutil.Error:
                    return  # the job has ended
                refreshed = now
            resident = 0
            for process in processes:
                try:
                    resident += process.memory_info().rss
                except psutil.Error:
                    refreshed = 0.0  # a process ended or started: walk the tree again next time
            used = resident + self._files_in_memory(processes)
            self.peak_bytes = max(self.peak_bytes, used)
            if used > self.limit_bytes:
                self.exceeded = True
                self._kill()
                return
            if self.check_output():
                self._kill()
                return
            self._stop.wait(SAMPLE_INTERVAL_S)

    def _files_in_memory(self, processes: list[psutil.Process]) -> int:
        """Bytes of the sandbox's tmpfs mounts and of the job's memory files, each counted once."""
        total = 0
        mounts_seen: set[int] = set()
        files_seen: set[tuple[int, int]] = set()
        for process in processes:
            proc = f"/proc/{process.pid}"
            for mount in _SANDBOX_MOUNTS:
                try:
                    device = os.stat(f"{proc}/root/{mount}").st_dev
                    if device not in mounts_seen and device not in self._host_devices:
                        mounts_seen.add(device)
                        usage = os.statvfs(f"{proc}/root/{mount}")
                        total += (usage.f_blocks - usage.f_bfree) * usage.f_frsize
                except OSError:
                    continue
            try:
                descriptors = os.listdir(f"{proc}/fd")
            except OSError:
                continue
            for fd in descriptors:
                try:
                    if not os.readlink(f"{proc}/fd/{fd}").startswith("/memfd:"):
                        continue
                    found = os.stat(f"{proc}/fd/{fd}")
                except OSError:
                    continue
                if (found.st_dev, found.st_ino) not in files_seen:
                    files_seen.add((found.st_dev, found.st_ino))
                    total += found.st_blocks * 512
        return total


def _folder_size(folder: Path, max_entries: int) -> tuple[int, int]:
    """The apparent size of the files under ``folder`` and its number of entries (counting stops past
    ``max_entries``); symbolic links are not followed."""
    total, entries = 0, 0
    pending = [str(folder)]
    while pending and entries <= max_entries:
        try:
            with os.scandir(pending.pop()) as scan:
                for entry in scan:
                    entries += 1
                    if entries > max_entries:
                        break
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        else:
                            found = entry.stat(follow_symlinks=False)
                            total += max(found.st_size, found.st_blocks * 512)
                    except OSError:
                        continue
        except OSError:
            continue
    return total, entries
