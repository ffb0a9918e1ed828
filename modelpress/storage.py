"""Where a job's files live: ``<data_dir>/jobs/<id>/{input/, spec.json, output/{model.pt, report.json}}``,
plus one file per export target the spec asks for (``output/model.onnx``, ...: ``modelpress.targets``).

Everything the job's process writes is under ``output/``, the only place its sandbox may write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.targets import TARGETS

ARTIFACT_FILE_NAMES = frozenset(target.file_name for target in TARGETS.values())


@dataclass(frozen=True)
class JobFiles:
    root: Path

    @property
    def input_model(self) -> Path:
        return self.root / "input" / "model.pt"

    @property
    def input_data(self) -> Path:
        return self.root / "input" / "data"

    @property
    def input_student(self) -> Path:
        return self.root / "input" / "student.pt"

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def output_model(self) -> Path:
        return self.root / "output" / "model.pt"

    @property
    def report(self) -> Path:
        return self.root / "output" / "report.json"

    def output_artifact(self, file_name: str) -> Path:
        """Where the job's process writes an export target's artifact (``Target.file_name``)."""
        return self.root / "output" / _artifact_name(file_name)

    # What a succeeded job serves: the output of the attempt that recorded the success, under
    # names only that attempt writes (see ``Supervisor._publish``), outside ``output/`` (the one
    # folder a confined job process may write, and which each attempt's supervisor tidies).
    # Records written before attempts existed (no attempt) serve the shared names.
    def published_model(self, attempt: int | None) -> Path:
        return self.root / f"model.attempt-{attempt}.pt" if attempt else self.output_model

    def published_report(self, attempt: int | None) -> Path:
        return self.root / f"report.attempt-{attempt}.json" if attempt else self.report

    def published_artifact(self, attempt: int | None, file_name: str) -> Path:
        """An export target's artifact as served (artifacts came after attempts: records without one have none)."""
        return (
            self.root / f"artifact.attempt-{attempt}.{_artifact_name(file_name)}"
            if attempt
            else self.output_artifact(file_name)
        )

    @property
    def process_log(self) -> Path:
        return self.root / "process.log"


class Storage:
    """Local-disk storage; one directory per job. Writes go to a temp name, then rename."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.uploads_dir = self.data_dir / "uploads"  # same filesystem as jobs_dir, so uploads move by rename

    def ensure(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)

    def job(self, job_id: str) -> JobFiles:
        return JobFiles(self.jobs_dir / job_id)

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job(job_id).root, ignore_errors=True)

    def spools_before(self, epoch_s: float) -> list[Path]:
        """Upload spool files last written before ``epoch_s``: a request still arriving writes its
        spool all the time, so these belong to API processes that were killed mid-request."""
        return _entries_before(self.uploads_dir, epoch_s, folders=False)

    def job_folders_before(self, epoch_s: float) -> list[Path]:
        """Job folders last written before ``epoch_s`` (see ``ObjectStore.stale_host_files``)."""
        return _entries_before(self.jobs_dir, epoch_s, folders=True)


def _artifact_name(file_name: str) -> str:
    # Only the targets' own names ever become paths: a name from a report cannot point elsewhere.
    if file_name not in ARTIFACT_FILE_NAMES:
        raise ValueError(f"{file_name!r} is not an export target's file name")
    return file_name


def _entries_before(directory: Path, epoch_s: float, folders: bool) -> list[Path]:
    found = []
    try:
        for entry in os.scandir(directory):
            try:
                if (entry.is_dir() if folders else entry.is_file()) and entry.stat().st_mtime < epoch_s:
                    found.append(Path(entry.path))
            except FileNotFoundError:
                continue  # its request ended meanwhile
    except FileNotFoundError:
        pass
    return found


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(value, handle, indent=2, sort_keys=True)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)
