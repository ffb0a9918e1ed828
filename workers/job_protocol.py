"""The protocol between a supervisor and its job process, in one place.

The supervisor starts ``python -m workers.job_process <job dir>`` with the environment that
``child_environment`` builds (nothing secret: no Redis URL, keys or master secret). The child
writes JSON lines ``{"event": ..., ...}`` on the file descriptor named by ``PROGRESS_FD``:
``started`` once it runs (inside the sandbox, before it reads the upload), ``progress`` with a
stage and a fraction, then ``succeeded`` or ``failed`` with a problem's slug, title and detail.
Whatever the child cannot say itself (it died, or never started) is turned into a problem here too.
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
from typing import IO, Any
from urllib.parse import urlparse

from modelpress.config import Settings
from workers.compression.errors import CompressionError, is_out_of_memory, summarize_torch_error

# Environment names the child reads.
PROGRESS_FD = "MODELPRESS_PROGRESS_FD"
# host:port of Redis (never its URL, which may hold a password): the child tries to connect to it,
# and must fail, to prove from inside that it has no network.
NETWORK_PROBE = "MODELPRESS_NETWORK_PROBE"
# Events, in the order a child sends them.
STARTED, PROGRESS, SUCCEEDED, FAILED = "started", "progress", "succeeded", "failed"
FINAL_EVENTS = (SUCCEEDED, FAILED)
_FILE_SIZE = re.compile(r"size <\d+>")

# Settings the child needs; read back there with Settings.from_env, so defaults live in config.py only.
_CHILD_SETTINGS = ("MODELPRESS_JOB_THREADS", "MODELPRESS_JOB_MEMORY_MB", "MODELPRESS_JOB_TIMEOUT_S", "MODELPRESS_SANDBOX",
                   "MODELPRESS_OP_CHECK")


def child_environment(settings: Settings, progress_fd: int, pythonpath: str) -> dict[str, str]:
    """A scrubbed environment: no Redis URL, keys or other secrets reach the model's process."""
    threads = str(settings.job_threads)
    passed = settings.to_env()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": pythonpath,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the code is mounted read-only in the sandbox
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        PROGRESS_FD: str(progress_fd),
        **{name: passed[name] for name in _CHILD_SETTINGS},
    }
    env.update(network_probe(settings))
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # keep this machine's OpenBLAS workarounds
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def network_probe(settings: Settings) -> dict[str, str]:
    redis_address = urlparse(settings.redis_url or "")
    if not redis_address.hostname:
        return {}
    return {NETWORK_PROBE: f"{redis_address.hostname}:{redis_address.port or 6379}"}


class Channel:
    """The child's end: one JSON object per line, flushed at once."""

    def __init__(self, fd: int) -> None:
        self._stream: IO[str] = os.fdopen(fd, "w", buffering=1)

    @classmethod
    def from_env(cls) -> "Channel":
        return cls(int(os.environ[PROGRESS_FD]))

    def send(self, event: str, **fields: Any) -> None:
        self._stream.write(json.dumps({"event": event, **fields}) + "\n")

    def progress(self, stage: str, fraction: float) -> None:
        self.send(PROGRESS, stage=stage, progress=round(min(max(fraction, 0.0), 1.0), 4))

    def fail(self, failure: dict[str, Any]) -> None:
        self.send(FAILED, slug=failure["slug"], title=failure["title"], detail=failure["detail"])

    def close(self) -> None:
        self._stream.flush()


def read_messages(read_fd: int, messages: "queue.Queue[dict[str, Any] | None]") -> None:
    """The supervisor's end: put each message on ``messages``, then ``None`` when the pipe closes."""
    with os.fdopen(read_fd, "r", errors="replace") as pipe:
        for line in pipe:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                messages.put(message)
    messages.put(None)


def problem(slug: str, title: str, detail: str) -> dict[str, Any]:
    """A failed job's ``error``: the same shape as the API's problem+json bodies."""
    return {"type": f"https://modelpress.dev/problems/{slug}", "title": title, "status": 422, "detail": detail}


def outcome_problem(message: dict[str, Any]) -> dict[str, Any]:
    return problem(message["slug"], message["title"], message["detail"])


def failure_of(error: BaseException, settings: Settings) -> dict[str, str]:
    """What the child reports for an exception. Engine errors carry their own sentence; the rest is
    summarised to one line of torch's message (never a traceback)."""
    if is_out_of_memory(error):
        return {"slug": "out-of-memory", "title": "Out of memory", "detail": memory_message(settings)}
    if isinstance(error, CompressionError):
        return {"slug": error.slug, "title": error.title, "detail": str(error)}
    # torch's file errors name sizes ("file <x> size <1234> is smaller than ..."): a model probing
    # files must not learn them from its job's error.
    summary = _FILE_SIZE.sub("size <...>", summarize_torch_error(error, limit=500))
    if not isinstance(error, RuntimeError):
        summary = f"{type(error).__name__}: {summary}"
    return {"slug": "compression-failed", "title": "Compression failed", "detail": summary}


def sandbox_unavailable(detail: str) -> dict[str, Any]:
    return problem("sandbox-unavailable", "Sandbox unavailable",
                   f"the job was not run because its confinement could not be set up: {detail} "
                   "(see the README's security section; MODELPRESS_SANDBOX=off runs jobs unconfined)")


def died(returncode: int, settings: Settings, started: bool, setup_error: str | None) -> dict[str, Any]:
    """The problem of a child that ended without a final message.

    ``started`` says whether it ever said so: a confined job that never started and was not killed
    by a signal failed in the sandbox's set-up (bubblewrap's own message, which no model code can
    have written, is shown).
    bubblewrap reports a child killed by signal N as exit status 128 + N.
    """
    signum = -returncode if returncode < 0 else returncode - 128 if settings.sandbox == "on" and returncode > 128 else 0
    if settings.sandbox == "on" and not started and (setup_error or signum == 0):
        return sandbox_unavailable(setup_error or f"the sandbox exited with status {returncode} before the job started")
    if signum > 0:
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
        if signum == signal.SIGSEGV:
            why = "it crashed with a segmentation fault (a native crash inside torch on this model)"
        elif signum == signal.SIGKILL:
            why = (f"it was killed with SIGKILL (out of memory under the {settings.job_memory_mb} MB limit, "
                   "or stopped by an operator)")
        else:
            why = f"it was stopped by {name}"
        detail = f"the compression process died: {why}"
    else:
        detail = f"the compression process exited with status {returncode} without reporting a result"
    return problem("process-died", "Compression process died", detail)


def memory_message(settings: Settings) -> str:
    return (f"the model needs more memory than the job's limit of {settings.job_memory_mb} MB "
            "(MODELPRESS_JOB_MEMORY_MB)")
