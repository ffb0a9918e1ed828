"""One compression run: load -> method -> save -> reload -> measure -> report."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from modelpress.formats import EXPORTED, TORCHSCRIPT, model_format

from . import distill, exported, prune, quantize
from .artifacts import load_model, save_model
from .errors import CompressionError, InvalidInput, UnsupportedModel
from .inputs import (Dataset, check_declared, check_input_count, example_batch, examples, fidelity_batches,
                     integer_range_hint, load_dataset)
from .measure import count_parameters, deflate_bytes, median_latency_ms, output_fidelity, run_model, significant
from .outputs import select_output
from .training import accuracy
from .verdict import warnings_for

Progress = Callable[[str, float], None]
Method = Callable[..., tuple[Any, dict[str, Any]]]

METHODS: dict[str, Method] = {
    "quantize": quantize.quantize,
    "prune": prune.prune,
    "distill": distill.distill,
}


@dataclass(frozen=True)
class ModelFormat:
    """How the engine handles one file format: what a method works on, what runs, how it is saved.

    ``load`` gives the form a method takes (a ScriptModule, or an ``ExportedProgram``); ``runnable``
    turns it into what is called on inputs. A method's result is saved in the format it came in.
    """

    name: str
    load: Callable[[str | os.PathLike], Any]
    runnable: Callable[[Any], Any]
    save: Callable[[Any, str | os.PathLike], int]
    methods: Mapping[str, Method]
    timed: Callable[[Any, str, Any], Any]  # (runnable, evaluation.runtime, batch) -> what the latency run calls


def _torchscript_timed(model: Any, runtime: str, batch: Any) -> Any:
    if runtime != "eager":
        raise UnsupportedModel(f"evaluation.runtime {runtime!r} applies to torch.export (.pt2) programs; "
                               "a TorchScript model runs in its own interpreter: use 'eager'")
    return model


FORMATS = {
    TORCHSCRIPT: ModelFormat(TORCHSCRIPT, load_model, lambda model: model, save_model, METHODS, _torchscript_timed),
    EXPORTED: ModelFormat(EXPORTED, exported.load_program, lambda program: program.module(), exported.save_program,
                          exported.METHODS, exported.timed_runner),
}


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
    method_name = spec["method"]
    form = FORMATS[model_format(Path(model_path))]  # told by layout; a .pt2 in gives a .pt2 out
    method = form.methods.get(method_name)
    if method is None:
        raise UnsupportedModel(f"method {method_name!r} is not available for {form.name} models")
    evaluation = spec.get("evaluation", {})
    runs, warmup = int(evaluation.get("runs", 20)), int(evaluation.get("warmup", 3))
    runtime = evaluation.get("runtime", "eager")

    progress("loading", 0.0)
    original = form.runnable(form.load(model_path))
    data: Dataset | None = load_dataset(data_path) if data_path else None
    if data is not None:
        check_declared(spec, data)  # the data file defines the inputs; a declared shape must agree with it
    batch = example_batch(spec, data)
    check_input_count(original, batch, from_data=data is not None)
    checks = fidelity_batches(spec, data)
    progress("checking inputs", 0.02)
    try:
        reference = [run_model(original, inputs) for inputs in checks]
        run_model(original, batch)
    except InvalidInput as error:
        raise InvalidInput(f"{error}{integer_range_hint(spec, data)}") from None
    if spec.get("output") is not None:
        select_output(reference[0], spec["output"])  # a wrong choice fails now, not after the method ran
    example_data = examples(spec, data)

    def method_progress(stage: str, fraction: float) -> None:
        progress(stage, 0.05 + 0.6 * min(max(fraction, 0.0), 1.0))

    # Methods may change the model in place, so they get their own copy; `original` stays the reference.
    working = form.load(model_path)
    extras = {"student": _load_student(student_path, form)} if student_path and method_name == "distill" else {}
    compressed, details = method(working, spec.get(method_name, {}), example_data, method_progress, **extras)

    progress("saving", 0.66)
    output_bytes = form.save(compressed, output_path)
    result = form.runnable(form.load(output_path))
    progress("measuring fidelity", 0.7)
    candidate = [run_model(result, inputs) for inputs in checks]
    fidelity = output_fidelity(reference, candidate)
    progress("measuring latency", 0.75)
    latency_before = median_latency_ms(form.timed(original, runtime, batch), batch, runs=runs, warmup=warmup)
    progress("measuring latency", 0.87)
    latency_after = median_latency_ms(form.timed(result, runtime, batch), batch, runs=runs, warmup=warmup)
    progress("writing report", 0.99)

    input_bytes = Path(model_path).stat().st_size
    parameters_before, parameters_after = count_parameters(original), count_parameters(result)
    report_accuracy = None
    if data is not None and data.labels is not None:
        report_accuracy = {"before": accuracy(original, example_data), "after": accuracy(result, example_data),
                           "samples": len(data), "on": "the uploaded data (fine-tuning, if any, trained on it too)"}
    warnings = warnings_for(method_name, spec.get(method_name, {}), details, fidelity, random_inputs=data is None)
    return {
        "method": method_name,
        "format": {"input": form.name, "output": form.name},
        "size": {
            "bytes_before": input_bytes,
            "bytes_after": output_bytes,
            "ratio": significant(output_bytes / input_bytes),
            "deflate_bytes_before": deflate_bytes(Path(model_path)),
            "deflate_bytes_after": deflate_bytes(Path(output_path)),
        },
        "parameters": {"before": parameters_before, "after": parameters_after},
        "latency": {
            "before_ms": significant(latency_before),
            "after_ms": significant(latency_after),
            "ratio": significant(latency_after / latency_before) if latency_before > 0 else None,
            "runtime": runtime,
            "batch_shape": list(batch[0].shape),
            "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in batch],
            "runs": runs,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "statistic": "median",
        },
        "fidelity": {**fidelity, "samples": sum(int(b[0].shape[0]) for b in checks),
                     "inputs": "data file" if data is not None else "random, as input_shape or inputs declares"},
        "accuracy": report_accuracy,
        "details": details,
        "warnings": warnings,
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }


def _load_student(path: str | os.PathLike, teacher: ModelFormat) -> Any:
    """An uploaded student, in the form the teacher's format trains (a .pt2 teacher trains a .pt2 student)."""
    student = FORMATS[model_format(Path(path))]
    if student.name != teacher.name:
        raise InvalidInput(f"the student is a {student.name} model and the teacher a {teacher.name} one: "
                           "upload both in the same format")
    return student.runnable(student.load(path))


__all__ = ["compress", "METHODS", "FORMATS", "CompressionError"]
