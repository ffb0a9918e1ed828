"""One compression run: load -> method -> save -> reload -> measure -> report."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from . import quantize
from .artifacts import load_model, save_model
from .errors import CompressionError, UnsupportedModel
from .inputs import Dataset, example_batch, fidelity_batches, load_dataset
from .measure import count_parameters, median_latency_ms, output_fidelity, run_model

Progress = Callable[[str, float], None]
Method = Callable[..., tuple[torch.jit.ScriptModule, dict[str, Any]]]

METHODS: dict[str, Method] = {
    "quantize": quantize.quantize,
}


def compress(
    model_path: str | os.PathLike,
    spec: Mapping[str, Any],
    output_path: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress the model at ``model_path`` as ``spec`` says; write ``output_path``; return the report.

    ``spec`` is a validated spec (defaults filled in). The saved artifact is loaded back
    and measured, so the report describes the file the user downloads.
    """
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

    compressed, details = method(original, spec.get(method_name, {}), data, method_progress)

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
    return {
        "method": method_name,
        "size": {
            "bytes_before": input_bytes,
            "bytes_after": output_bytes,
            "ratio": round(output_bytes / input_bytes, 4),
        },
        "parameters": {"before": parameters_before, "after": parameters_after},
        "latency": {
            "before_ms": round(latency_before, 3),
            "after_ms": round(latency_after, 3),
            "ratio": round(latency_after / latency_before, 4) if latency_before > 0 else None,
            "batch_shape": list(batch.shape),
            "runs": runs,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "statistic": "median",
        },
        "fidelity": {**fidelity, "samples": sum(int(b.shape[0]) if b.dim() else 1 for b in checks),
                     "inputs": "data file" if data is not None else "random normal of input_shape"},
        "details": details,
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }


__all__ = ["compress", "METHODS", "CompressionError"]
