"""One compression run: load -> method -> save -> reload -> measure -> report."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from . import distill, prune, quantize
from .artifacts import load_model, save_model
from .errors import CompressionError, InvalidInput, UnsupportedModel
from .inputs import (Dataset, check_declared, check_input_count, example_batch, examples, fidelity_batches,
                     integer_range_hint, load_dataset)
from .measure import count_parameters, latency_samples_ms, output_fidelity, run_model
from .outputs import select_output
from .training import accuracy
from .verdict import warnings_for

Progress = Callable[[str, float], None]
Method = Callable[..., tuple[torch.jit.ScriptModule, dict[str, Any]]]

DEFLATE_SAMPLE_CHUNKS = 64  # files above this many MB get an estimated deflate size

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
    progress = progress or (lambda stage, fraction: None)
    method_name = spec["method"]
    method = METHODS.get(method_name)
    if method is None:
        raise UnsupportedModel(f"method {method_name!r} is not available in this engine")
    evaluation = spec.get("evaluation", {})
    runs, warmup = int(evaluation.get("runs", 20)), int(evaluation.get("warmup", 3))
    max_seconds = evaluation.get("max_seconds")
    clock = _StageClock()

    # Memory: one full copy of the model at a time, plus what the method adds (see "Memory for big
    # models" in docs/decisions.md). Everything the report needs from the original is measured
    # first; the method then works on the original itself, and it is dropped before the saved
    # result is loaded back.
    progress("loading", 0.0)
    with clock("load"):
        original = load_model(model_path)
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
        example_data = examples(spec, data)
        progress("measuring latency", 0.03)
        latency_before = latency_samples_ms(original, batch, runs=runs, warmup=warmup, max_seconds=max_seconds)
        parameters_before = count_parameters(original)
        labelled = data is not None and data.labels is not None
        accuracy_before = accuracy(original, example_data) if labelled else None

    def method_progress(stage: str, fraction: float) -> None:
        progress(stage, 0.05 + 0.6 * min(max(fraction, 0.0), 1.0))

    with clock("transform"):
        extras = {"student": load_model(student_path)} if student_path and method_name == "distill" else {}
        compressed, details = method(original, spec.get(method_name, {}), example_data, method_progress, **extras)

    progress("saving", 0.66)
    with clock("save"):
        output_bytes = save_model(compressed, output_path)
    del original, compressed, extras
    gc.collect()  # the float model's memory goes back before the result is loaded
    with clock("load"):
        result = load_model(output_path)
    progress("measuring fidelity", 0.7)
    with clock("measure"):
        candidate = [run_model(result, inputs) for inputs in checks]
        fidelity = output_fidelity(reference, candidate)
        progress("measuring latency", 0.8)
        latency_after = latency_samples_ms(result, batch, runs=runs, warmup=warmup, max_seconds=max_seconds)
        parameters_after = count_parameters(result)
        accuracy_after = accuracy(result, example_data) if labelled else None
        progress("writing report", 0.95)
        deflate_before, sampled_before = _deflate_bytes(Path(model_path))
        deflate_after, sampled_after = _deflate_bytes(Path(output_path))

    input_bytes = Path(model_path).stat().st_size
    report_accuracy = None
    if labelled:
        report_accuracy = {"before": accuracy_before, "after": accuracy_after,
                           "samples": len(data), "on": "the uploaded data (fine-tuning, if any, trained on it too)"}
    warnings = warnings_for(method_name, spec.get(method_name, {}), details, fidelity, random_inputs=data is None)
    median_before, median_after = statistics.median(latency_before), statistics.median(latency_after)
    return {
        "method": method_name,
        "size": {
            "bytes_before": input_bytes,
            "bytes_after": output_bytes,
            "ratio": _significant(output_bytes / input_bytes),
            "deflate_bytes_before": deflate_before,
            "deflate_bytes_after": deflate_after,
            **({"deflate_estimated_from": f"{DEFLATE_SAMPLE_CHUNKS} evenly spaced 1 MB chunks of each file"}
               if sampled_before or sampled_after else {}),
        },
        "parameters": {"before": parameters_before, "after": parameters_after},
        "latency": {
            "before_ms": _significant(median_before),
            "after_ms": _significant(median_after),
            "ratio": _significant(median_after / median_before) if median_before > 0 else None,
            "batch_shape": list(batch[0].shape),
            "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in batch],
            "runs": runs,
            "runs_timed": {"before": len(latency_before), "after": len(latency_after)},
            "max_seconds": max_seconds,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "statistic": "median",
        },
        "fidelity": {**fidelity, "samples": sum(int(b[0].shape[0]) for b in checks),
                     "inputs": "data file" if data is not None else "random, as input_shape or inputs declares"},
        "accuracy": report_accuracy,
        "details": details,
        "warnings": warnings,
        "timings_s": clock.totals(),
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }


class _StageClock:
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


def _significant(value: float, digits: int = 5) -> float:
    """Round to significant digits, not decimals: a 0.0015 ratio keeps its precision."""
    return float(f"{value:.{digits}g}")


def _deflate_bytes(path: Path) -> tuple[int, bool]:
    """Size after deflate (zlib level 6): what zeros from unstructured pruning save in transit and storage.

    Deflate runs at about 15-30 MB/s on one core, minutes for a 2 GB model, so a file larger than
    ``DEFLATE_SAMPLE_CHUNKS`` MB is estimated from that many evenly spaced 1 MB chunks (weights are
    spread evenly through the archive; the estimate's error is well under 1 % on such files).
    Returns the bytes and whether they are an estimate.
    """
    size = path.stat().st_size
    chunk = 1 << 20
    compressor = zlib.compressobj(6)
    total = 0
    with open(path, "rb") as handle:
        if size <= DEFLATE_SAMPLE_CHUNKS * chunk:
            for block in iter(lambda: handle.read(chunk), b""):
                total += len(compressor.compress(block))
            return total + len(compressor.flush()), False
        stride = size // DEFLATE_SAMPLE_CHUNKS
        for index in range(DEFLATE_SAMPLE_CHUNKS):
            handle.seek(index * stride)
            total += len(compressor.compress(handle.read(chunk)))
    total += len(compressor.flush())
    return round(total * size / (DEFLATE_SAMPLE_CHUNKS * chunk)), True


__all__ = ["compress", "METHODS", "CompressionError"]
