"""The report's ``targets`` section (issue 25), checked like the rest of the child's report.

The job's process writes ``report["targets"]``: one entry per export target the spec asked for,
``{"status": "succeeded", "file": "model.onnx", "format", "runtime", "precision", "bytes", "latency_ms",
"latency_ratio", "fidelity", "notes"}`` or ``{"status": "failed", "reason"}``. The child is untrusted:
only targets the spec asked for, a succeeded entry's ``file`` exactly its target's own file name (so
no name from the report ever becomes a path), strings and numbers bounded, fields not listed here
dropped. ``bytes`` and ``sha256`` are measured by the supervisor when the file is published
(``ObjectStore.publish_artifact``), never taken from the child.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Callable
from typing import Any

from modelpress.storage import JobFiles
from modelpress.targets import TARGETS
from workers.job_protocol import MAX_WARNING_CHARS, InvalidReport

SUCCEEDED, FAILED = "succeeded", "failed"
MAX_NOTES = 20
MAX_LABEL_CHARS = 200  # format, runtime, precision
_FIDELITY_FIGURES = ("cosine_similarity", "top1_agreement", "max_abs_error")  # measure.output_fidelity's


def check_targets(report: dict[str, Any], asked: tuple[str, ...], required: bool, files: JobFiles) -> list[str]:
    """Check ``report["targets"]`` in place (unknown fields dropped); the names of the succeeded targets,
    whose files exist under ``output/`` as regular files. ``InvalidReport`` names the field at fault.

    ``asked`` and ``required`` are the spec's ``targets`` and ``targets_required`` (from the job's record).
    A target asked for but missing from the report, or failed, is allowed unless ``required``.
    """
    section = report.get("targets", {})
    if not isinstance(section, dict):
        raise InvalidReport("'targets' is not an object")
    unknown = sorted(set(section) - set(asked))
    if unknown:
        raise InvalidReport(
            f"'targets.{_quoted(unknown[0])}': the spec did not ask for it (asked: {', '.join(asked) or 'none'})"
        )
    checked = {name: _entry(name, section[name], files) for name in asked if name in section}
    if required:
        missing = [name for name in asked if checked.get(name, {}).get("status") != SUCCEEDED]
        if missing:
            raise InvalidReport(f"'targets.{missing[0]}' did not succeed, and the spec's targets_required is true")
    if section or "targets" in report:
        report["targets"] = checked
    return [name for name, entry in checked.items() if entry["status"] == SUCCEEDED]


def failed_reason(entry: dict[str, Any] | None) -> str:
    """Why a target has no artifact, from its checked report entry (None: the report does not name it)."""
    if entry is None:
        return "the job's report does not mention it (its export did not run)"
    return entry.get("reason") or "its export failed"


def _entry(name: str, entry: Any, files: JobFiles) -> dict[str, Any]:
    where = f"targets.{name}"
    if not isinstance(entry, dict):
        raise InvalidReport(f"'{where}' is not an object")
    status = entry.get("status")
    if status not in (SUCCEEDED, FAILED):
        raise InvalidReport(f"'{where}.status' is not 'succeeded' or 'failed'")
    fields = _SUCCEEDED_FIELDS if status == SUCCEEDED else _FAILED_FIELDS
    checked: dict[str, Any] = {"status": status}
    for field, check in fields.items():
        if field in entry:
            wrong = check(entry[field])
            if wrong:
                raise InvalidReport(f"'{where}.{field}' {wrong}")
            checked[field] = entry[field]
    if status == FAILED:
        return checked
    file_name = TARGETS[name].file_name
    if entry.get("file") != file_name:
        raise InvalidReport(f"'{where}.file' is not {file_name!r} (the only file a {name} target may name)")
    try:
        mode = files.output_artifact(file_name).lstat().st_mode  # not followed: a link is refused
    except FileNotFoundError:
        raise InvalidReport(f"'{where}.file': output/{file_name} does not exist") from None
    if not stat.S_ISREG(mode):
        raise InvalidReport(f"'{where}.file': output/{file_name} is not a plain file")
    return checked


def _quoted(name: str) -> str:
    """A key the child chose, shown bounded and printable in the job's error."""
    return repr(name[:40])[1:-1]


def _text(limit: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or len(value) > limit or not value.isprintable():
            return f"is not a printable string of at most {limit} characters"
        return None

    return check


def _figure(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return "is not a finite number of at least 0, or null"
    return None


def _fidelity(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "is not an object"
    for figure in _FIDELITY_FIGURES:
        value_at = value.get(figure)
        if value_at is not None and (
            isinstance(value_at, bool) or not isinstance(value_at, (int, float)) or not math.isfinite(value_at)
        ):
            return f"has a {figure} that is not a finite number or null"
    return None


def _shape(value: Any) -> str | None:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= 8
        or any(isinstance(n, bool) or not isinstance(n, int) or not 0 < n < 1 << 31 for n in value)
    ):
        return "is not a list of 1 to 8 positive sizes"
    return None


def _notes(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > MAX_NOTES or any(_text(MAX_WARNING_CHARS)(note) for note in value):
        return f"is not a list of at most {MAX_NOTES} strings of at most {MAX_WARNING_CHARS} characters"
    return None


_SUCCEEDED_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "file": _text(64),
    "format": _text(MAX_LABEL_CHARS),
    "runtime": _text(MAX_LABEL_CHARS),
    "precision": _text(MAX_LABEL_CHARS),
    "latency_ms": _figure,
    "latency_ratio": _figure,
    "fidelity": _fidelity,
    "batch_shape": _shape,
    "notes": _notes,
}
_FAILED_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "reason": _text(MAX_WARNING_CHARS),
    "runtime": _text(MAX_LABEL_CHARS),
    "notes": _notes,
}
