"""The protocol between a supervisor and its job process, in one place.

The supervisor starts ``python -m workers.job_process <job dir>`` with the environment that
``child_environment`` builds (nothing secret: no Redis URL, keys or master secret). The child
writes JSON lines ``{"event": ..., ...}`` on the file descriptor named by ``PROGRESS_FD``:
``started`` once it runs (inside the sandbox, before it reads the upload), ``ready`` once torch and
the engine are imported (the supervisor times the job's start-up by it), ``progress`` with a
stage and a fraction, then ``succeeded`` or ``failed`` with a problem's slug, title and detail.
A pre-started process (``workers.warm_sandbox``) first says ``warm`` once it has imported them and
waits for its job on stdin; it says ``started`` when one is handed over.
Whatever the child cannot say itself (it died, or never started) is turned into a problem here too.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import urlparse

from modelpress.config import Settings
from modelpress.formats import AOTI_PACKAGE, EXPORTED, TORCHSCRIPT
from modelpress.targets import TARGETS
from workers.engine.errors import CompressionError, is_out_of_memory, summarize_torch_error

JOB_PROCESS = (sys.executable, "-m", "workers.job_process")  # the child's command; its job directory follows
# Environment names the child reads.
PROGRESS_FD = "MODELPRESS_PROGRESS_FD"
# host:port of Redis (never its URL, which may hold a password): the child tries to connect to it,
# and must fail, to prove from inside that it has no network.
NETWORK_PROBE = "MODELPRESS_NETWORK_PROBE"
# Events, in the order a child sends them.
WARM, STARTED, READY, PROGRESS, SUCCEEDED, FAILED = "warm", "started", "ready", "progress", "succeeded", "failed"
FINAL_EVENTS = (SUCCEEDED, FAILED)
_FILE_SIZE = re.compile(r"size <\d+>")

# Bounds on what the child may send or leave (the supervisor holds no more than these).
MAX_LINE_BYTES = 64 << 10  # one message on the pipe
_READ_CHUNK = 16 << 10
MESSAGE_QUEUE_SIZE = 256  # messages read but not yet handled; a flooding child waits on its pipe
MAX_STAGE_CHARS = 200
MAX_TITLE_CHARS = 200
MAX_DETAIL_CHARS = 4000
MAX_REPORT_BYTES = 1 << 20  # output/report.json
MAX_WARNINGS = 100
MAX_WARNING_CHARS = 2000
MAX_TIMINGS = 32  # stages in report.timings_s (the engine times about six)
OUTPUT_FORMATS = (TORCHSCRIPT, EXPORTED, AOTI_PACKAGE)
# The report's figures the supervisor copies into the job record (``Supervisor._result_summary``).
_REPORT_FIGURES = (
    ("size", "ratio"),
    ("latency", "ratio"),
    ("fidelity", "cosine_similarity"),
    ("fidelity", "top1_agreement"),
)
# ``output/`` may hold this much: a compressed model is rarely larger than its input, an AOTInductor
# package adds its compiled code. RLIMIT_FSIZE in the job and the supervisor's watch both apply it.
OUTPUT_INPUT_FACTOR = 4
OUTPUT_ALLOWANCE_BYTES = 64 << 20
MAX_TARGETS = len(TARGETS)
MAX_OUTPUT_ENTRIES = 64  # files and folders under output/ (the job writes two, plus temporary names)

# Settings the child needs; read back there with Settings.from_env, so defaults live in config.py only.
_CHILD_SETTINGS = (
    "MODELPRESS_JOB_THREADS",
    "MODELPRESS_JOB_MEMORY_MB",
    "MODELPRESS_JOB_TIMEOUT_S",
    "MODELPRESS_SANDBOX",
    "MODELPRESS_OP_CHECK",
)


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
        # Inductor (aoti, compile) would start a pool of compiling processes sized by the host's cores.
        "TORCHINDUCTOR_COMPILE_THREADS": threads,
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
    def from_env(cls) -> Channel:
        return cls(int(os.environ[PROGRESS_FD]))

    def send(self, event: str, **fields: Any) -> None:
        self._stream.write(json.dumps({"event": event, **fields}) + "\n")

    def progress(self, stage: str, fraction: float) -> None:
        self.send(PROGRESS, stage=stage, progress=round(min(max(fraction, 0.0), 1.0), 4))

    def fail(self, failure: dict[str, Any]) -> None:
        self.send(FAILED, slug=failure["slug"], title=failure["title"], detail=failure["detail"])

    def close(self) -> None:
        self._stream.flush()


class Violation(NamedTuple):
    """The child broke the protocol: what was wrong, in words that quote at most a few bytes of it."""

    reason: str


def read_messages(read_fd: int, messages: queue.Queue[dict[str, Any] | Violation | None]) -> None:
    """The supervisor's end: put each valid message on ``messages``, then ``None`` when the pipe closes.

    The child is untrusted: the pipe is read in raw chunks and no more than ``MAX_LINE_BYTES`` of
    one line is ever held, so a line without end costs the supervisor 64 KB, not the child's
    output. The first line that is too long or breaks the schema (``parse_message``) is put as a
    ``Violation`` and reading stops (the supervisor then kills the child). ``messages`` should be
    bounded: a child that floods valid messages then blocks on its own pipe.
    """
    pending = bytearray()
    count = 0
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(_READ_CHUNK)
            if not chunk:
                break
            searched = len(pending)
            pending += chunk
            while (end := pending.find(b"\n", searched)) >= 0:
                count += 1
                message = parse_message(bytes(pending[:end]), count)
                del pending[: end + 1]
                searched = 0
                messages.put(message)
                if isinstance(message, Violation):
                    return
            if len(pending) > MAX_LINE_BYTES:
                messages.put(
                    Violation(
                        f"message {count + 1} is longer than {MAX_LINE_BYTES} bytes (starts {_excerpt(bytes(pending))})"
                    )
                )
                return
    # A partial last line (the child was killed mid-write) is dropped: its exit status says what happened.
    messages.put(None)


def parse_message(line: bytes, number: int = 1) -> dict[str, Any] | Violation:
    """One line of the pipe, checked against the schema of its event; a ``Violation`` when it breaks it."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return Violation(f"message {number} is not JSON (starts {_excerpt(line)})")
    if not isinstance(message, dict):
        return Violation(f"message {number} is not a JSON object (starts {_excerpt(line)})")
    event = message.get("event")
    if event not in _EVENT_FIELDS:
        return Violation(f"message {number} has an unknown event (starts {_excerpt(line)})")
    expected = _EVENT_FIELDS[event]
    unknown = set(message) - {"event", *expected}
    if unknown:
        return Violation(f"message {number} ({event}) has {len(unknown)} unknown field(s)")
    for name, check in expected.items():
        if name not in message:
            return Violation(f"message {number} ({event}) has no {name!r}")
        wrong = check(message[name])
        if wrong:
            return Violation(f"message {number} ({event}): {name!r} {wrong}")
    return message


def _text(limit: int, pattern: re.Pattern[str] | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return "is not a string"
        if not value or len(value) > limit:
            return f"is not 1 to {limit} characters"
        if pattern is not None and not pattern.fullmatch(value):
            return f"does not match {pattern.pattern}"
        if not value.isprintable():
            return "holds control characters"
        return None

    return check


def _fraction(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return "is not a number from 0 to 1"
    return None


# Each event's fields and their checks (no other field is accepted). Stages are free text from the
# engine (``trial 2/8 (prune 0.5): measuring latency``), so they are bounded, not enumerated.
_EVENT_FIELDS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    WARM: {},
    STARTED: {},
    READY: {},
    PROGRESS: {"stage": _text(MAX_STAGE_CHARS), "progress": _fraction},
    SUCCEEDED: {},
    FAILED: {
        "slug": _text(64, re.compile(r"[a-z0-9-]{1,64}")),
        "title": _text(MAX_TITLE_CHARS),
        "detail": lambda value: (
            None
            if isinstance(value, str) and len(value) <= MAX_DETAIL_CHARS
            else f"is not a string of at most {MAX_DETAIL_CHARS} characters"
        ),
    },
}


def _excerpt(data: bytes) -> str:
    """The first few bytes of what the child sent, for the job's error: enough to recognise, never the payload."""
    return repr(data[:16])[1:] + ("..." if len(data) > 16 else "")


def protocol_violation(violation: Violation) -> dict[str, Any]:
    return problem(
        "protocol-violation",
        "Protocol violation",
        f"the compression process broke the supervisor's protocol and was stopped: {violation.reason}",
    )


# ---------------------------------------------------------------------------- the report


class InvalidReport(ValueError):
    """``output/report.json`` breaks the report's bounds or types; the message says which."""


def read_report(path: Path) -> dict[str, Any]:
    """The child's report, checked before anything of it is believed or stored.

    At most ``MAX_REPORT_BYTES``; a JSON object; ``warnings`` a short list of short strings; every
    figure the supervisor or the API reads a finite number or null; ``timings_s`` stage names to
    seconds (the supervisor adds its own ``startup`` there, ``workers.warm_sandbox.stamp_report``). Figures the supervisor can
    measure itself (the file sizes) are replaced by its own (``Supervisor._publish``).
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_REPORT_BYTES + 1)
    except OSError as error:
        raise InvalidReport(f"it could not be read ({error.strerror or error})") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise InvalidReport(f"it is larger than {MAX_REPORT_BYTES >> 10} KB")
    try:
        report = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise InvalidReport(f"it is not JSON ({type(error).__name__})") from None
    if not isinstance(report, dict):
        raise InvalidReport("it is not a JSON object")
    warnings = report.get("warnings", [])
    if not isinstance(warnings, list) or len(warnings) > MAX_WARNINGS:
        raise InvalidReport(f"'warnings' is not a list of at most {MAX_WARNINGS} entries")
    if not all(isinstance(warning, str) and len(warning) <= MAX_WARNING_CHARS for warning in warnings):
        raise InvalidReport(f"a warning is not a string of at most {MAX_WARNING_CHARS} characters")
    for section, name in _REPORT_FIGURES:
        value = report.get(section, {}) if isinstance(report.get(section, {}), dict) else None
        if value is None:
            raise InvalidReport(f"{section!r} is not an object")
        figure = value.get(name)
        if figure is not None and (
            isinstance(figure, bool) or not isinstance(figure, (int, float)) or not math.isfinite(figure)
        ):
            raise InvalidReport(f"'{section}.{name}' is not a finite number or null")
    timings = report.get("timings_s", {})
    if (
        not isinstance(timings, dict)
        or len(timings) > MAX_TIMINGS
        or not all(
            isinstance(name, str) and len(name) <= MAX_STAGE_CHARS and _seconds(value)
            for name, value in timings.items()
        )
    ):
        raise InvalidReport(f"'timings_s' is not an object of at most {MAX_TIMINGS} stages, each a number of seconds")
    output_format = report.get("format", {}).get("output") if isinstance(report.get("format"), dict) else None
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise InvalidReport("'format.output' is not a known format")
    return report


def _seconds(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def invalid_report(error: InvalidReport) -> dict[str, Any]:
    return problem(
        "invalid-report", "Invalid report", f"the compression process wrote a report that is refused: {error}"
    )


def output_limit_bytes(files: Any) -> int:
    """How much ``output/`` may hold: ``OUTPUT_INPUT_FACTOR`` times the uploaded models plus an allowance,
    once for the model and once more for each export target the spec asks for (each is the same model
    in another format)."""
    inputs = sum(path.stat().st_size for path in (files.input_model, files.input_student) if path.exists())
    return (1 + asked_targets(files)) * OUTPUT_INPUT_FACTOR * inputs + OUTPUT_ALLOWANCE_BYTES


def asked_targets(files: Any) -> int:
    """How many export targets the job's ``spec.json`` (written by the API, after its checks) asks for."""
    try:
        targets = json.loads(files.spec.read_bytes()[:MAX_REPORT_BYTES]).get("targets") or []
    except (OSError, ValueError, AttributeError):
        return 0
    return min(len(targets), MAX_TARGETS) if isinstance(targets, list) else 0


def output_too_large(limit_bytes: int, seen_bytes: int, entries: int) -> dict[str, Any]:
    if entries > MAX_OUTPUT_ENTRIES:
        what = f"{entries} files and folders (at most {MAX_OUTPUT_ENTRIES})"
    else:
        what = (
            f"at least {seen_bytes >> 20} MB (at most {limit_bytes >> 20} MB: {OUTPUT_INPUT_FACTOR} times the "
            f"uploaded model for it and each export target, plus {OUTPUT_ALLOWANCE_BYTES >> 20} MB)"
        )
    return problem(
        "output-too-large", "Output too large", f"the compression process wrote {what} under output/ and was stopped"
    )


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
    return problem(
        "sandbox-unavailable",
        "Sandbox unavailable",
        f"the job was not run because its confinement could not be set up: {detail} "
        "(see docs/security.md; MODELPRESS_SANDBOX=off runs jobs unconfined)",
    )


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
            why = (
                f"it was killed with SIGKILL (out of memory under the {settings.job_memory_mb} MB limit, "
                "or stopped by an operator)"
            )
        else:
            why = f"it was stopped by {name}"
        detail = f"the compression process died: {why}"
    else:
        detail = f"the compression process exited with status {returncode} without reporting a result"
    return problem("process-died", "Compression process died", detail)


def memory_message(settings: Settings) -> str:
    return f"the model needs more memory than the job's limit of {settings.job_memory_mb} MB (MODELPRESS_JOB_MEMORY_MB)"
