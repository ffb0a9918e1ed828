"""Watch a job's child while it runs: read its messages off the pipe (``job_protocol.read_messages``),
beat the job's heartbeat with its progress, and stop its process group at its time limit, on a
cancel, a takeover (``Superseded``) or a protocol violation. ``workers.supervisor`` starts the
child and turns how it ended (``ChildEnd``) into the job's final state.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.jobs import Superseded
from workers import job_protocol as protocol
from workers.job_protocol import Violation

POLL_INTERVAL_S = 0.25
PROGRESS_WRITE_INTERVAL_S = 0.5  # progress and heartbeat


@dataclass(frozen=True)
class ChildEnd:
    """How the watch ended: ``stop_reason`` is why the supervisor stopped the child ("superseded",
    "cancelled", "violation", "timeout"), None when the child exited by itself."""

    stop_reason: str | None
    violation: Violation | None
    outcome: dict[str, Any] | None  # the child's final event, if it sent one
    started: bool
    ready_at: float | None = None  # time.monotonic() of its first "ready" message (the report's startup)


def watch_child(
    child: subprocess.Popen, read_fd: int, beat: Callable[..., Any], time_limit_s: int, since: float | None = None
) -> ChildEnd:
    """Watch ``child`` until it exits or is stopped. ``beat(**fields)`` writes the job's heartbeat
    (with ``process_pid``, or ``stage`` and ``progress``); it returns True once the job is cancelled
    (``default`` while Redis is unreachable) and raises ``Superseded`` once the attempt is not the job's.
    The time limit counts from ``since`` (``time.monotonic()``; default now): when its process was asked for."""
    messages: queue.Queue[dict[str, Any] | Violation | None] = queue.Queue(protocol.MESSAGE_QUEUE_SIZE)
    threading.Thread(target=protocol.read_messages, args=(read_fd, messages), daemon=True).start()
    stop_reason: str | None = None
    try:
        beat(process_pid=child.pid)
    except Superseded:
        stop_reason = "superseded"

    deadline = (time.monotonic() if since is None else since) + time_limit_s
    outcome: dict[str, Any] | None = None
    violation: Violation | None = None
    last_progress: dict[str, Any] | None = None
    started = False
    ready_at: float | None = None
    last_write = 0.0
    while not stop_reason:
        try:
            message = messages.get(timeout=POLL_INTERVAL_S)
        except queue.Empty:
            message = {}
        if message is None:  # pipe closed: the child has exited or is exiting
            while child.poll() is None:  # tearing down a torch process can take a while: keep beating
                try:
                    beat()
                except Superseded:
                    break  # the final write will be refused; nothing to stop
                if time.monotonic() > deadline:
                    break  # a child that closed its pipe still ends at its time limit
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(POLL_INTERVAL_S)  # returns as soon as it exits: a small job's end is not delayed
            if child.poll() is None:
                stop_reason = "timeout"
                kill_group(child)
            child.wait()
            break
        if isinstance(message, Violation):
            violation, stop_reason = message, "violation"
        elif message.get("event") == protocol.STARTED:
            started = True
        elif message.get("event") == protocol.READY and ready_at is None:
            ready_at = time.monotonic()
        elif message.get("event") == protocol.PROGRESS:
            last_progress = message
        elif message.get("event") in protocol.FINAL_EVENTS:
            outcome = message
        now = time.monotonic()
        if not stop_reason and now - last_write >= PROGRESS_WRITE_INTERVAL_S:
            # Redis may be restarting: the child goes on, progress is written once it is back.
            progress = {"stage": last_progress["stage"], "progress": last_progress["progress"]} if last_progress else {}
            try:
                if beat(default=False, **progress):
                    stop_reason = "cancelled"
                last_progress = None
            except Superseded:
                stop_reason = "superseded"
            last_write = now
        if not stop_reason and now > deadline:
            stop_reason = "timeout"
        if stop_reason:
            kill_group(child)
            break
    return ChildEnd(stop_reason, violation, outcome, started, ready_at)


def kill_group(child: subprocess.Popen) -> None:
    signal_group(child)
    child.wait()


def signal_group(child: subprocess.Popen) -> None:
    """SIGKILL the child's process group (from any thread; the supervisor's loop reaps it). A forked one
    (``workers.fork_sandbox.Forked``) is stopped through its pidfd: its monitor reaped, a PID may be reused."""
    stop = getattr(child, "stop", None)
    if stop is not None:
        stop()
        return
    if child.returncode is None:  # not reaped: its PID, and so its /proc entry, are still its own
        _kill_children(child.pid)
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_children(pid: int) -> None:
    """SIGKILL ``pid``'s direct children through pidfds, whatever their process group. Under bubblewrap that
    is the sandbox's PID 1, whose death from outside ends its whole PID namespace: a job that got native code
    could write that (dumpable, unfiltered) init's memory on a kernel without Yama and move it out of the
    group a group kill reaches (red team)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for word in children:
        try:
            pidfd = os.pidfd_open(int(word))
        except OSError:
            continue  # ended meanwhile
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
