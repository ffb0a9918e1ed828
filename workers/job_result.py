"""What the supervisor records of a finished compression, measured rather than believed where it can
be: the report's file sizes measured on the real files (``measure_sizes``), and the job record's
result summary (``result_summary``). ``workers.supervisor`` calls both when it publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelpress.artifacts import file_sha256
from modelpress.formats import TORCHSCRIPT
from modelpress.storage import JobFiles


def result_summary(model: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The job record's ``result``: the published model's size and digest, read from the file, and the
    report's headline figures (the targets' status, size and digest)."""
    return {
        "bytes": model.stat().st_size,
        "sha256": file_sha256(model),
        "format": report.get("format", {}).get("output", TORCHSCRIPT),
        "size_ratio": report["size"]["ratio"],
        "latency_ratio": report["latency"]["ratio"],
        "cosine_similarity": report["fidelity"]["cosine_similarity"],
        "top1_agreement": report["fidelity"]["top1_agreement"],
        **(
            {
                "targets": {
                    name: {key: entry[key] for key in ("status", "bytes", "sha256") if key in entry}
                    for name, entry in report["targets"].items()
                }
            }
            if report.get("targets")
            else {}
        ),
    }


def measure_sizes(report: dict[str, Any], files: JobFiles) -> None:
    """Replace the report's file sizes with the supervisor's own measure of the real files: a child
    that forges its report cannot claim a size it did not reach. (Latency and fidelity are the
    child's measures; checking them would mean running the model outside the sandbox.)"""
    before, after = files.input_model.stat().st_size, files.output_model.stat().st_size
    size = report["size"] if isinstance(report.get("size"), dict) else {}
    size.update(bytes_before=before, bytes_after=after, ratio=float(f"{after / before:.5g}") if before else None)
    report["size"] = size
