"""One compression run: load -> method (or steps, or a search) -> save -> reload -> measure -> report."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelpress.formats import AOTI_PACKAGE, EXPORTED, model_format
from modelpress.options import JobOptions, job_options
from workers.engine.errors import CompressionError, UnsupportedModel
from workers.engine.formats.aoti import package_aoti
from workers.engine.formats.registry import FORMATS
from workers.engine.methods.registry import method_entry
from workers.engine.run.prepare import Prepared, Progress, load_student, prepare
from workers.engine.run.report import measure_result
from workers.engine.run.search import search
from workers.engine.run.steps import finish_sections, run_steps, step_warnings
from workers.engine.run.targets import make_targets
from workers.engine.run.verdict import collapse_warnings, warnings_for


def compress(
    model_path: str | os.PathLike,
    spec: JobOptions | Mapping[str, Any],
    output_path: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
    student_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compress the model at ``model_path`` as ``spec`` says; write ``output_path``; return the report.

    ``spec`` is the job's options (``modelpress.options``), or a validated spec they are made from;
    ``student_path`` is an uploaded student for distillation. The saved artifact is loaded back
    and measured, so the report describes the file the user downloads.
    """
    job = spec if isinstance(spec, JobOptions) else job_options(spec)
    progress = progress or (lambda stage, fraction: None)
    form = FORMATS[model_format(Path(model_path))]  # told by layout; a .pt2 in gives a .pt2 out
    for step in job.steps:
        method_entry(form.name, step.method)  # an unknown method fails before any work
    prepared = prepare(model_path, job, data_path, progress)
    student = load_student(student_path, form) if student_path else None
    if job.searching:
        return _packaged(search(prepared, job, output_path, progress, student), job, output_path, prepared)

    def method_progress(stage: str, fraction: float) -> None:
        progress(stage, 0.05 + 0.6 * min(max(fraction, 0.0), 1.0))

    # Memory: one full copy of the model at a time, plus what the method adds (docs/architecture.md,
    # "Memory for big models"): the original was measured in `prepare`, the method transforms it
    # itself, and it is dropped before the saved result is loaded back.
    steps = job.steps
    clock = prepared.clock
    working = prepared.hand_over()
    scratch = tempfile.TemporaryDirectory(prefix="modelpress-float-") if job.targets else None
    float_copy = Path(scratch.name) / Path(output_path).name if scratch else None
    with clock("transform"):
        compressed, step_reports = run_steps(
            working, steps, prepared, method_progress, student, file_name=Path(output_path).name, float_copy=float_copy
        )
    progress("saving", 0.66)
    with clock("save"):
        form.save(compressed, output_path)
    del working, compressed, student
    gc.collect()  # the float model's memory goes back before the result is loaded
    if len(steps) == 1:
        details = step_reports[0]["details"]
        warnings = warnings_for(steps[0], details, {}, random_inputs=prepared.data is None)
    else:
        details = {"steps": [step.method for step in steps]}
        warnings = step_warnings(steps, step_reports, prepared)
    report = measure_result(prepared, None, output_path, lambda stage, f: progress(stage, 0.66 + 0.33 * f))
    methods = [step.method for step in steps]
    warnings += collapse_warnings(
        "distill" if "distill" in methods else job.method, report["fidelity"], random_inputs=prepared.data is None
    )
    report = {"method": job.method, **report, "details": details, "warnings": warnings, "timings_s": clock.totals()}
    if len(steps) > 1:
        report["steps"] = finish_sections(step_reports, report)
    if scratch is not None and float_copy is not None:
        with scratch:  # the targets export the float model before an int8 step, else the result itself
            source = float_copy if float_copy.exists() else Path(output_path)
            report["targets"], target_warnings = make_targets(
                prepared, job, source, Path(output_path).parent, lambda stage, f: progress(stage, 0.97 + 0.02 * f)
            )
        report["warnings"] += target_warnings
        report["timings_s"] = clock.totals()
    return _packaged(report, job, output_path, prepared)


def _packaged(
    report: dict[str, Any], job: JobOptions, output_path: str | os.PathLike, prepared: Prepared
) -> dict[str, Any]:
    """With ``package: aoti`` the measured program is compiled by AOTInductor into the output file."""
    if job.package == "program":
        return report
    if prepared.form.name != EXPORTED:
        raise UnsupportedModel(
            "package 'aoti' compiles torch.export (.pt2) programs; a TorchScript model is "
            "returned as TorchScript (drop 'package')"
        )
    with prepared.clock("package"):
        report["package"] = package = package_aoti(output_path, prepared.checks)
    if package["max_relative_error_to_program"] > 1e-2:
        report["warnings"] = [
            *report.get("warnings", []),
            (
                f"the AOTInductor package's outputs differ from the program's by up to "
                f"{package['max_relative_error_to_program']:.2%} of the largest output on the check batches"
            ),
        ]
    report["format"]["output"] = AOTI_PACKAGE
    report["timings_s"] = prepared.clock.totals()
    return report


__all__ = ["CompressionError", "compress"]
