"""One compression run: load -> method (or steps, or a search) -> save -> reload -> measure -> report."""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from modelpress.formats import AOTI_PACKAGE, EXPORTED, TORCHSCRIPT, model_format
from modelpress.spec import AUTO, REGISTRY, filled_options, method_steps

from workers.engine.formats import exported
from workers.engine.formats.torchscript import load_model, save_model
from workers.engine.errors import CompressionError, InvalidInput, UnsupportedModel
from workers.engine.inputs import (Dataset, Inputs, check_declared, check_input_count, example_batch, examples, fidelity_batches,
                     integer_range_hint, load_dataset)
from workers.engine.measure import (DEFLATE_SAMPLE_CHUNKS, count_parameters, deflate_bytes, latency_samples_ms, output_fidelity,
                      run_model, significant)
from workers.engine.outputs import select_output
from workers.engine.analysis.torchscript_graph import module_types
from workers.engine.methods.training import accuracy
from workers.engine.run.verdict import collapse_warnings, warnings_for

Progress = Callable[[str, float], None]
Method = Callable[..., tuple[Any, dict[str, Any]]]
# After each step of a pipeline: may stop the run (search: the target is already missed) by returning a reason.
StepCheck = Callable[[int, Any], "str | None"]


def method_function(name: str) -> Method:
    """The engine entry a method registered (``modelpress.spec.REGISTRY``)."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise UnsupportedModel(f"method {name!r} is not available in this engine")
    module, _, function = entry.engine.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class ModelFormat:
    """How the engine handles one file format: what a method works on, what runs, how it is saved.

    ``load`` gives the form a method takes (a ScriptModule, or an ``ExportedProgram``); ``runnable``
    turns it into what is called on inputs. A method's result is saved in the format it came in.
    ``method`` finds a method's entry for this format (TorchScript: the registry).
    """

    name: str
    load: Callable[[str | os.PathLike], Any]
    runnable: Callable[[Any], Any]
    save: Callable[[Any, str | os.PathLike], int]
    method: Callable[[str], Method]
    timed: Callable[[Any, str, Any], Any]  # (runnable, evaluation.runtime, batch) -> what the latency run calls
    layer_types: Callable[[Any], set[str]]  # the layer types a runnable holds ('Linear', 'Conv2d', 'LSTM', ...)


def _torchscript_timed(model: Any, runtime: str, batch: Any) -> Any:
    if runtime != "eager":
        raise UnsupportedModel(f"evaluation.runtime {runtime!r} applies to torch.export (.pt2) programs; "
                               "a TorchScript model runs in its own interpreter: use 'eager'")
    return model


def _exported_method(name: str) -> Method:
    method = exported.METHODS.get(name)
    if method is None:
        raise UnsupportedModel(f"method {name!r} is not available for torch.export (.pt2) programs yet; "
                               "upload the model as TorchScript for it")
    return method


FORMATS = {
    TORCHSCRIPT: ModelFormat(TORCHSCRIPT, load_model, lambda model: model, save_model, method_function,
                             _torchscript_timed, lambda model: set(module_types(model).values())),
    EXPORTED: ModelFormat(EXPORTED, exported.load_program, exported.runnable, exported.save_program,
                          _exported_method, exported.timed_runner, exported.layer_types),
}


class StageClock:
    """Wall seconds spent per stage (load, transform, save, measure), summed over the stage's visits."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._totals[stage] = self._totals.get(stage, 0.0) + time.perf_counter() - start

    def totals(self) -> dict[str, float]:
        return {stage: round(seconds, 3) for stage, seconds in self._totals.items()}


@dataclass
class Prepared:
    """The original model, the inputs every measurement of one job uses, and what was measured on
    the original before any method ran (so a single run can hand the original itself to the method:
    one copy of a big model in memory, not two)."""

    model_path: Path
    form: ModelFormat
    original: Any  # what runs (a ScriptModule, or an exported program's module); None once handed over
    data: Dataset | None  # the uploaded file, if any
    batch: Inputs  # what latency is timed on
    checks: list[Inputs]  # what fidelity is measured on
    reference: list[Any]  # the original's outputs on ``checks``
    examples: Dataset  # what methods train and calibrate on
    runs: int
    warmup: int
    runtime: str  # evaluation.runtime: how latency is measured (eager, compile, aoti)
    max_seconds: float | None  # evaluation.max_seconds: the time budget of each latency measurement
    latency_before: list[float] = field(default_factory=list)  # ms per timed pass of the original
    parameters_before: int = 0
    accuracy_before: float | None = None  # on the examples, when they have labels
    clock: StageClock = field(default_factory=StageClock)

    def hand_over(self) -> Any:
        """What a single run's method transforms. A TorchScript original is handed over itself (it was
        measured already); a .pt2 program is loaded again (the runnable module is not the program)."""
        if self.form.name != TORCHSCRIPT:
            with self.clock("load"):
                return self.form.load(self.model_path)
        model, self.original = self.original, None
        return model


def compress(
    model_path: str | os.PathLike,
    spec: Mapping[str, Any],
    output_path: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
    student_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compress the model at ``model_path`` as ``spec`` says; write ``output_path``; return the report.

    ``spec`` is a validated spec (defaults filled in); ``student_path`` is an uploaded student
    for distillation. The saved artifact is loaded back
    and measured, so the report describes the file the user downloads.
    """
    progress = progress or (lambda stage, fraction: None)
    form = FORMATS[model_format(Path(model_path))]  # told by layout; a .pt2 in gives a .pt2 out
    searching = spec["method"] == AUTO or bool(spec.get("target"))
    for _, step in method_steps(spec):
        form.method(step["method"])  # an unknown method fails before any work
    prepared = prepare(model_path, spec, data_path, progress)
    student = _load_student(student_path, form) if student_path else None
    if searching:
        from workers.engine.run.search import search  # the search builds on this module

        return _packaged(search(prepared, spec, output_path, progress, student), spec, output_path, prepared)

    def method_progress(stage: str, fraction: float) -> None:
        progress(stage, 0.05 + 0.6 * min(max(fraction, 0.0), 1.0))

    # Memory: one full copy of the model at a time, plus what the method adds (docs/decisions.md,
    # "Memory for big models"): the original was measured in `prepare`, the method transforms it
    # itself, and it is dropped before the saved result is loaded back.
    steps = [step for _, step in method_steps(spec)]
    clock = prepared.clock
    working = prepared.hand_over()
    with clock("transform"):
        compressed, step_reports = run_steps(working, steps, prepared, method_progress, student,
                                             file_name=Path(output_path).name)
    progress("saving", 0.66)
    with clock("save"):
        form.save(compressed, output_path)
    del working, compressed, student
    gc.collect()  # the float model's memory goes back before the result is loaded
    if len(steps) == 1:
        details = step_reports[0]["details"]
        warnings = warnings_for(spec["method"], spec[spec["method"]], details, {}, random_inputs=prepared.data is None)
    else:
        details = {"steps": [step["method"] for step in steps]}
        warnings = step_warnings(step_reports, prepared)
    report = measure_result(prepared, None, output_path, lambda stage, f: progress(stage, 0.66 + 0.33 * f))
    methods = [step["method"] for step in steps]
    warnings += collapse_warnings("distill" if "distill" in methods else spec["method"], report["fidelity"],
                                  random_inputs=prepared.data is None)
    report = {"method": spec["method"], **report, "details": details, "warnings": warnings,
              "timings_s": clock.totals()}
    if len(steps) > 1:
        report["steps"] = finish_sections(step_reports, report)
    return _packaged(report, spec, output_path, prepared)


def _packaged(report: dict[str, Any], spec: Mapping[str, Any], output_path: str | os.PathLike,
              prepared: Prepared) -> dict[str, Any]:
    """With ``package: aoti`` the measured program is compiled by AOTInductor into the output file."""
    if spec.get("package", "program") == "program":
        return report
    if prepared.form.name != EXPORTED:
        raise UnsupportedModel("package 'aoti' compiles torch.export (.pt2) programs; a TorchScript model is "
                               "returned as TorchScript (drop 'package')")
    with prepared.clock("package"):
        report["package"] = package = exported.package_aoti(output_path, prepared.checks)
    if package["max_relative_error_to_program"] > 1e-2:
        report["warnings"] = [*report.get("warnings", []), (
            f"the AOTInductor package's outputs differ from the program's by up to "
            f"{package['max_relative_error_to_program']:.2%} of the largest output on the check batches")]
    report["format"]["output"] = AOTI_PACKAGE
    report["timings_s"] = prepared.clock.totals()
    return report


def prepare(model_path: str | os.PathLike, spec: Mapping[str, Any], data_path: str | os.PathLike | None,
            progress: Progress) -> Prepared:
    """Load the model and the data; check that the example inputs fit the model before any method runs."""
    evaluation = spec.get("evaluation", {})
    form = FORMATS[model_format(Path(model_path))]
    clock = StageClock()
    progress("loading", 0.0)
    with clock("load"):
        original = form.runnable(form.load(model_path))
        data: Dataset | None = load_dataset(data_path) if data_path else None
    if data is not None:
        check_declared(spec, data)  # the data file defines the inputs; a declared shape must agree with it
    batch = example_batch(spec, data)
    check_input_count(original, batch, from_data=data is not None)
    checks = fidelity_batches(spec, data)
    progress("checking inputs", 0.02)
    with clock("measure"):
        try:
            reference = [run_model(original, inputs) for inputs in checks]
            run_model(original, batch)
        except InvalidInput as error:
            raise InvalidInput(f"{error}{integer_range_hint(spec, data)}") from None
        if spec.get("output") is not None:
            select_output(reference[0], spec["output"])  # a wrong choice fails now, not after the method ran
        prepared = Prepared(Path(model_path), form, original, data, batch, checks, reference, examples(spec, data),
                            int(evaluation.get("runs", 20)), int(evaluation.get("warmup", 3)),
                            evaluation.get("runtime", "eager"), evaluation.get("max_seconds"), clock=clock)
        progress("measuring latency", 0.03)
        prepared.latency_before = _latency(prepared, original)
        prepared.parameters_before = count_parameters(original)
        if data is not None and prepared.examples.labels is not None:
            prepared.accuracy_before = accuracy(original, prepared.examples)
    return prepared


def _latency(prepared: Prepared, model: Any) -> list[float]:
    return latency_samples_ms(prepared.form.timed(model, prepared.runtime, prepared.batch), prepared.batch,
                              runs=prepared.runs, warmup=prepared.warmup, max_seconds=prepared.max_seconds)


def run_steps(model: Any, steps: Sequence[Mapping[str, Any]], prepared: Prepared,
              progress: Progress, student: Any | None = None, data: Dataset | None = None,
              check: StepCheck | None = None, file_name: str = "model.pt",
              ) -> tuple[Any, list[dict[str, Any]]]:
    """Run single-method steps in order, each on the model the one before saved (and loaded back).

    Every step trains and calibrates on ``data`` (default: the job's examples). Returns the last
    model and one report section per step; ``check`` may end the run after a step (the section
    then says why, under ``stopped``).
    """
    data = data or prepared.examples
    form = prepared.form
    sections: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-steps-") as directory:
        for index, step in enumerate(steps):
            name = step["method"]
            label = f"step {index + 1}/{len(steps)} {name}: " if len(steps) > 1 else ""
            started = time.perf_counter()
            extras = {"student": student} if name == "distill" and student is not None else {}
            model, details = form.method(name)(
                model, filled_options(name, step.get(name, {})), data,
                lambda stage, fraction, i=index: progress(f"{label}{stage}", (i + min(max(fraction, 0.0), 1.0)) / len(steps)),
                **extras)
            if index + 1 < len(steps):
                # The next step gets what a user would download after this one: a saved, reloaded file.
                # Named as the output will be: torch.jit.save stores the file's name inside the archive.
                path = Path(directory) / f"step{index}" / file_name
                path.parent.mkdir()
                size = form.save(model, path)
                model = form.load(path)
                runnable = form.runnable(model)
                candidate = [run_model(runnable, inputs) for inputs in prepared.checks]
                sections.append({"method": name, name: dict(step.get(name, {})), "bytes": size,
                                 "size_ratio": significant(size / prepared.model_path.stat().st_size),
                                 "parameters": count_parameters(runnable),
                                 "fidelity": output_fidelity(prepared.reference, candidate),
                                 "time_s": round(time.perf_counter() - started, 3), "details": details})
            else:  # the last step's file is the output, which the caller saves and measures (finish_sections)
                sections.append({"method": name, name: dict(step.get(name, {})), "details": details,
                                 "time_s": round(time.perf_counter() - started, 3)})
            reason = check(index, model) if check is not None else None
            if reason is not None:
                sections[-1]["stopped"] = reason
                break
    return model, sections


def finish_sections(sections: list[dict[str, Any]], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The last step's section takes its file's figures from the report of the output (the same file)."""
    sections[-1].update({"bytes": report["size"]["bytes_after"], "size_ratio": report["size"]["ratio"],
                         "parameters": report["parameters"]["after"], "fidelity": report["fidelity"]})
    return sections


def step_warnings(sections: Sequence[Mapping[str, Any]], prepared: Prepared) -> list[str]:
    """The methods' own warnings of each step, named by step (collapse is judged once, on the result)."""
    warnings = []
    for number, section in enumerate(sections, start=1):
        name = section["method"]
        for warning in warnings_for(name, section.get(name, {}), section["details"], {},
                                    random_inputs=prepared.data is None):
            warnings.append(f"step {number} ({name}): {warning}")
    return warnings


def measure_result(prepared: Prepared, compressed: Any | None, output_path: str | os.PathLike,
                   progress: Progress, judged_on: Dataset | None = None) -> dict[str, Any]:
    """Save ``compressed`` (None: the file is already there), load it back and measure the file: size,
    parameters, latency, fidelity, accuracy.

    Accuracy is measured on ``judged_on`` when given (a search's held-out rows), else on the data file.
    """
    progress("saving", 0.0)
    form, clock = prepared.form, prepared.clock
    if compressed is not None:
        with clock("save"):
            form.save(compressed, output_path)
    output_bytes = Path(output_path).stat().st_size
    with clock("load"):
        result = form.runnable(form.load(output_path))
    batch, checks, data = prepared.batch, prepared.checks, prepared.data
    with clock("measure"):
        progress("measuring fidelity", 0.1)
        candidate = [run_model(result, inputs) for inputs in checks]
        fidelity = output_fidelity(prepared.reference, candidate)
        progress("measuring latency", 0.4)
        latency_after = _latency(prepared, result)
        parameters_after = count_parameters(result)
        progress("writing report", 0.8)
        (deflate_before, sampled_before), (deflate_after, sampled_after) = (
            deflate_bytes(prepared.model_path), deflate_bytes(Path(output_path)))

    model_path = prepared.model_path
    input_bytes = model_path.stat().st_size
    report_accuracy = None
    judged = judged_on or prepared.examples
    if data is not None and judged.labels is not None:
        on = ("the held-out rows of the data file, which no training or calibration saw" if judged_on is not None
              else "the uploaded data (fine-tuning, if any, trained on it too)")
        # A search keeps the original (it judges every candidate against it); a single run measured it in `prepare`.
        before = accuracy(prepared.original, judged) if judged_on is not None else prepared.accuracy_before
        report_accuracy = {"before": before, "after": accuracy(result, judged), "samples": len(judged), "on": on}
    median_before, median_after = statistics.median(prepared.latency_before), statistics.median(latency_after)
    return {
        "format": {"input": form.name, "output": form.name},
        "size": {
            "bytes_before": input_bytes,
            "bytes_after": output_bytes,
            "ratio": significant(output_bytes / input_bytes),
            "deflate_bytes_before": deflate_before,
            "deflate_bytes_after": deflate_after,
            **({"deflate_estimated_from": f"{DEFLATE_SAMPLE_CHUNKS} evenly spaced 1 MB chunks of each file"}
               if sampled_before or sampled_after else {}),
        },
        "parameters": {"before": prepared.parameters_before, "after": parameters_after},
        "latency": {
            "before_ms": significant(median_before),
            "after_ms": significant(median_after),
            "ratio": significant(median_after / median_before) if median_before > 0 else None,
            "runtime": prepared.runtime,
            "batch_shape": list(batch[0].shape),
            "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in batch],
            "runs": prepared.runs,
            "runs_timed": {"before": len(prepared.latency_before), "after": len(latency_after)},
            "max_seconds": prepared.max_seconds,
            "warmup": prepared.warmup,
            "threads": torch.get_num_threads(),
            "statistic": "median",
        },
        "fidelity": {**fidelity, "samples": sum(int(b[0].shape[0]) for b in checks),
                     "inputs": "data file" if data is not None else "random, as input_shape or inputs declares"},
        "accuracy": report_accuracy,
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }


def _load_student(path: str | os.PathLike, teacher: ModelFormat) -> Any:
    """An uploaded student, in the form the teacher's format trains (a .pt2 teacher trains a .pt2 student)."""
    student = FORMATS[model_format(Path(path))]
    if student.name != teacher.name:
        raise InvalidInput(f"the student is a {student.name} model and the teacher a {teacher.name} one: "
                           "upload both in the same format")
    return student.runnable(student.load(path))


__all__ = ["compress", "method_function", "FORMATS", "CompressionError", "prepare", "run_steps", "measure_result"]
