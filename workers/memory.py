"""The job's memory limit, on resident memory: the supervisor watches its job's process tree.

``RLIMIT_AS`` counted address space, of which importing torch alone maps about 3.3 GB, so a
limit of 8 GB left room for a model of barely 1 GB. What a job really costs the machine is the
resident memory of its processes, so that is what is limited: a thread samples the resident
set of every process of the job (bubblewrap and the job process inside it) every
``SAMPLE_INTERVAL_S`` and kills the job's process group the moment the sum exceeds the limit.
The supervisor then fails the job with the out-of-memory reason. A cgroup would stop the
allocation itself rather than a sample after it; this one works without cgroup delegation,
which containers often lack (see docs/decisions.md, "Memory for big models"). The job process
keeps a loose address-space cap as a backstop against one huge allocation between two samples.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import psutil

SAMPLE_INTERVAL_S = 0.05  # at memset speed (a few GB/s) a job can overshoot by a few hundred MB
TREE_REFRESH_S = 1.0  # how often the list of the job's processes is walked again (it rarely changes)


class MemoryWatch:
    """Samples the resident memory of the process tree rooted at ``pid``; calls ``kill`` once over ``limit_bytes``."""

    def __init__(self, pid: int, limit_bytes: int, kill: Callable[[], None]) -> None:
        self.limit_bytes = limit_bytes
        self.peak_bytes = 0
        self.exceeded = False
        self._kill = kill
        self._stop = threading.Event()
        try:
            self._root: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:
            self._root = None
        self._thread = threading.Thread(target=self._run, name=f"memory-watch-{pid}", daemon=True)

    def start(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

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
            self.peak_bytes = max(self.peak_bytes, resident)
            if resident > self.limit_bytes:
                self.exceeded = True
                self._kill()
                return
            self._stop.wait(SAMPLE_INTERVAL_S)
