"""One compression run: load -> method -> save -> reload -> measure -> report."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from modelpress.formats import EXPORTED, TORCHSCRIPT, model_format

from . import distill, prune, quantize
from .artifacts import load_model, save_model
from .errors import CompressionError, UnsupportedModel
from .exported import compress_exported
from .inputs import Dataset, example_batch, examples, fidelity_batches, load_dataset
from .measure import count_parameters, median_latency_ms, output_fidelity, run_model
from .measure import deflate_bytes as _deflate_bytes, significant as _significant
from .training import accuracy

Progress = Callable[[str, float], None]
Method = Callable[..., tuple[torch.jit.ScriptModule, dict[str, Any]]]

METHODS: dict[str, Method] = {
    "quantize": quantize.quantize,
    "prune": prune.prune,
    "distill": distill.distill,
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
    if model_format(Path(model_path)) == EXPORTED:  # a torch.export .pt2 in, a .pt2 out
        return compress_exported(model_path, spec, output_path, data_path, progress, student_path)
    progress = progress or (lambda stage, fraction: None)
    method_name = spec["method"]
    method = METHODS.get(method_name)
    if method is None:
        raise UnsupportedModel(f"method {method_name!r} is not available in this engine")
    evaluation = spec.get("evaluation", {})
    runs, warmup = int(evaluation.get("runs", 20)), int(evaluation.get("warmup", 3))

    progress("loading", 0.0)
    original = load_model(model_path)
    data: Dataset | None = load_dataset(data_path) if data_path else None
    batch = example_batch(spec, data)
    checks = fidelity_batches(spec, data)
    progress("checking inputs", 0.02)
    reference = [run_model(original, inputs) for inputs in checks]
    run_model(original, batch)

    def method_progress(stage: str, fraction: float) -> None:
        progress(stage, 0.05 + 0.6 * min(max(fraction, 0.0), 1.0))

    # Methods may change the model in place, so they get their own copy; `original` stays the reference.
    working = load_model(model_path)
    extras = {"student": load_model(student_path)} if student_path and method_name == "distill" else {}
    compressed, details = method(working, spec.get(method_name, {}), examples(spec, data), method_progress, **extras)

    progress("saving", 0.66)
    output_bytes = save_model(compressed, output_path)
    result = load_model(output_path)
    progress("measuring fidelity", 0.7)
    candidate = [run_model(result, inputs) for inputs in checks]
    fidelity = output_fidelity(reference, candidate)
    progress("measuring latency", 0.75)
    latency_before = median_latency_ms(original, batch, runs=runs, warmup=warmup)
    progress("measuring latency", 0.87)
    latency_after = median_latency_ms(result, batch, runs=runs, warmup=warmup)
    progress("writing report", 0.99)

    input_bytes = Path(model_path).stat().st_size
    parameters_before, parameters_after = count_parameters(original), count_parameters(result)
    report_accuracy = None
    if data is not None and data.labels is not None:
        report_accuracy = {"before": accuracy(original, data), "after": accuracy(result, data), "samples": len(data),
                           "on": "the uploaded data (fine-tuning, if any, trained on it too)"}
    return {
        "method": method_name,
        "format": {"input": TORCHSCRIPT, "output": TORCHSCRIPT},
        "size": {
            "bytes_before": input_bytes,
            "bytes_after": output_bytes,
            "ratio": _significant(output_bytes / input_bytes),
            "deflate_bytes_before": _deflate_bytes(Path(model_path)),
            "deflate_bytes_after": _deflate_bytes(Path(output_path)),
        },
        "parameters": {"before": parameters_before, "after": parameters_after},
        "latency": {
            "before_ms": _significant(latency_before),
            "after_ms": _significant(latency_after),
            "ratio": _significant(latency_after / latency_before) if latency_before > 0 else None,
            "batch_shape": list(batch.shape),
            "runs": runs,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "statistic": "median",
        },
        "fidelity": {**fidelity, "samples": sum(int(b.shape[0]) if b.dim() else 1 for b in checks),
                     "inputs": "data file" if data is not None else "random normal of input_shape"},
        "accuracy": report_accuracy,
        "details": details,
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }


__all__ = ["compress", "METHODS", "CompressionError"]
