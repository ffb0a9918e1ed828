"""How much resident memory a job needs for its model, per method: checked at submit.

A job whose model cannot fit the job memory limit (``MODELPRESS_JOB_MEMORY_MB``, resident memory
of the job's processes) is refused at submit with the reason, instead of failing "Out of memory"
minutes later. The figures are what ``bench/scale.py`` measured (docs/operations/scaling.md, "Big models"), rounded up:
the job process's resident base (interpreter, torch, the evaluation batches) plus a multiple of
the model's file size. Methods not measured at scale get a conservative multiple.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BASE_MB = 1024  # interpreter + torch (~520 MB measured) + activations of modest example batches

# Model copies held at the peak, as multiples of the model file's bytes.
MODEL_MULTIPLE = {
    "quantize:dynamic": 2.0,  # the float model, its int8 copy, allocator slack (measured ~1.9x at 0.5-2 GB)
    "prune:unstructured": 1.5,  # the model, pruned in place tensor by tensor (measured ~1.2x)
}
UNMEASURED_MULTIPLE = 3.0  # static quantization, structured pruning, fine-tuning, distillation: several copies


def method_key(spec: Mapping[str, Any]) -> str:
    method = spec.get("method", "")
    if method == "quantize":
        return f"quantize:{spec.get('quantize', {}).get('mode', 'dynamic')}"
    if method == "prune":
        options = spec.get("prune", {})
        if options.get("finetune"):
            return "prune:finetune"
        return "prune:structured" if options.get("structured") else "prune:unstructured"
    return method


def needed_mb(spec: Mapping[str, Any], model_bytes: int, extra_bytes: int = 0) -> int:
    """Resident memory the job is expected to need; ``extra_bytes``: a student or data file, held once."""
    multiple = MODEL_MULTIPLE.get(method_key(spec), UNMEASURED_MULTIPLE)
    return BASE_MB + int((multiple * model_bytes + extra_bytes) / (1 << 20)) + 1


def refusal(spec: Mapping[str, Any], model_bytes: int, extra_bytes: int, limit_mb: int) -> str | None:
    """Why the job cannot fit ``limit_mb``, or None when it can."""
    need = needed_mb(spec, model_bytes, extra_bytes)
    if need <= limit_mb:
        return None
    fitting = [
        key.replace(":", " ")
        for key, multiple in MODEL_MULTIPLE.items()
        if BASE_MB + multiple * (model_bytes + extra_bytes) / (1 << 20) <= limit_mb
    ]
    hint = f"; at this size these fit: {', '.join(fitting)}" if fitting else ""
    return (
        f"a model of {model_bytes >> 20} MB needs about {need} MB of memory for {method_key(spec).replace(':', ' ')}, "
        f"more than the job memory limit of {limit_mb} MB (MODELPRESS_JOB_MEMORY_MB){hint}"
    )
