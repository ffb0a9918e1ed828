"""The report's figures: the saved result loaded back and measured against the original."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from workers.engine.inputs import Dataset
from workers.engine.measure import (
    DEFLATE_SAMPLE_CHUNKS,
    count_parameters,
    deflate_bytes,
    output_fidelity,
    run_model,
    significant,
)
from workers.engine.methods.training import accuracy
from workers.engine.run.prepare import Prepared, Progress, latency_of


def measure_result(
    prepared: Prepared,
    compressed: Any | None,
    output_path: str | os.PathLike,
    progress: Progress,
    judged_on: Dataset | None = None,
) -> dict[str, Any]:
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
        latency_after = latency_of(prepared, result)
        parameters_after = count_parameters(result)
        progress("writing report", 0.8)
        (deflate_before, sampled_before), (deflate_after, sampled_after) = (
            deflate_bytes(prepared.model_path),
            deflate_bytes(Path(output_path)),
        )

    model_path = prepared.model_path
    input_bytes = model_path.stat().st_size
    report_accuracy = None
    judged = judged_on or prepared.examples
    if data is not None and judged.labels is not None:
        on = (
            "the held-out rows of the data file, which no training or calibration saw"
            if judged_on is not None
            else "the uploaded data (fine-tuning, if any, trained on it too)"
        )
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
            **(
                {"deflate_estimated_from": f"{DEFLATE_SAMPLE_CHUNKS} evenly spaced 1 MB chunks of each file"}
                if sampled_before or sampled_after
                else {}
            ),
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
        "fidelity": {
            **fidelity,
            "samples": sum(int(b[0].shape[0]) for b in checks),
            "inputs": "data file" if data is not None else "random, as input_shape or inputs declares",
        },
        "accuracy": report_accuracy,
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }
