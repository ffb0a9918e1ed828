"""A job's export targets: the compressed model as extra artifacts for other runtimes, each checked and
timed on its own runtime against the same original outputs and batch as the main result.

Each target exports the job's model *before* its int8 step (``float_source``) and quantizes it with
its own tooling, on the job's own calibration rows and with the same recipe (static or dynamic,
per-channel or not): an int8 job gives int8 artifacts. The report's ``targets`` section has one
entry per target asked for; a target that fails says why there (and in ``warnings``), and fails
the job only with ``targets_required``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modelpress.options import JobOptions, Step
from modelpress.targets import TARGETS
from workers.engine.errors import CompressionError, TargetFailed, summarize_torch_error
from workers.engine.inputs import Inputs
from workers.engine.measure import output_fidelity, significant
from workers.engine.run.prepare import Prepared, Progress

CALIBRATION_ROWS = 32  # rows per calibration batch, as the job's own static int8 (methods/quantize/static.py)


def make_targets(
    prepared: Prepared, job: JobOptions, float_source: Path, output_dir: Path, progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    """Export, check and time each target of ``job``; write each artifact into ``output_dir``
    under its served name. Returns the report's ``targets`` section and warnings."""
    section: dict[str, Any] = {}
    warnings: list[str] = []
    for index, name in enumerate(job.targets):
        progress(f"target {name}", index / len(job.targets))
        try:
            section[name] = make_target(prepared, name, job.steps, float_source, output_dir)
        except Exception as error:  # the main result stands; this target says why it could not be made
            reason = failure_reason(name, error)
            if job.targets_required:
                raise TargetFailed(name, f"could not be made (targets_required): {reason}") from None
            section[name] = {"status": "failed", "reason": reason}
            warnings.append(f"target {name} failed: {reason} (the main result is unaffected)")
    return section, warnings


def make_target(
    prepared: Prepared, name: str, steps: Sequence[Step], float_source: Path, output_dir: Path
) -> dict[str, Any]:
    """One target's artifact of the model ``steps`` made, written to ``output_dir`` under its served
    name, checked and timed on its runtime: its report entry. Raises when it cannot be made."""
    from workers.engine.targets.common import TargetRequest, tool_home
    from workers.engine.targets.registry import export_target, target_module

    quantize = _int8_step(steps)
    with prepared.clock("targets"), tool_home(), tempfile.TemporaryDirectory(prefix=f"modelpress-{name}-") as scratch:
        # A fresh copy for each target: exporters may change the module they are given (the
        # TorchScript ONNX exporter does), and no target should see another's changes.
        request = TargetRequest(
            model=prepared.form.load(float_source),
            format_name=prepared.form.name,
            example=prepared.batch,
            calibration=_calibration(prepared, quantize),
            quantize=_target_mode(quantize),
            per_channel=quantize.options.per_channel if quantize else True,
        )
        artifact = export_target(name, request, Path(scratch))
        path = output_dir / TARGETS[name].file_name
        shutil.move(str(artifact.path), path)
        measured = _measured(prepared, target_module(name), artifact, path)
        if quantize is not None and quantize.options.mode == "qat":
            measured["notes"].append(
                "quantization-aware training is not mirrored: this target quantizes the model "
                "before training post-training (static int8 on the same calibration rows)"
            )
        return measured


def _target_mode(quantize: Step | None) -> str | None:
    """The int8 recipe a target applies: the job's mode, static for qat (targets have no training)."""
    if quantize is None:
        return None
    return "static" if quantize.options.mode == "qat" else quantize.options.mode


def failure_reason(name: str, error: BaseException) -> str:
    """Why target ``name`` could not be made, in one line."""
    if isinstance(error, CompressionError):
        return str(error).removeprefix(f"{name}: ")
    return summarize_torch_error(error)


def _int8_step(steps: Sequence[Step]) -> Step | None:
    """The int8 quantize step the targets mirror (it must be the last step)."""
    chosen = [step for step in steps if step.method == "quantize" and step.options.dtype == "qint8"]
    if not chosen:
        return None
    if chosen[-1] is not steps[-1]:
        raise CompressionError("export targets mirror a quantize step that comes last; move it to the end")
    return chosen[-1]


def _calibration(prepared: Prepared, quantize: Step | None) -> list[Inputs]:
    """The rows the job's own static int8 calibrated on: ``calibration_batches`` batches of 32."""
    if _target_mode(quantize) != "static":
        return []
    examples = prepared.examples
    count = min(len(examples), CALIBRATION_ROWS * int(quantize.options.calibration_batches or 8))
    return [
        examples.rows(slice(start, min(start + CALIBRATION_ROWS, count))) for start in range(0, count, CALIBRATION_ROWS)
    ]


def _measured(prepared: Prepared, module: Any, artifact: Any, path: Path) -> dict[str, Any]:
    """The artifact loaded by its runtime: outputs against the original's, latency on the job's batch."""
    loaded = module.load(path)
    candidate = [
        _shaped_like(reference, _run(module, loaded, batch, artifact.batch))
        for reference, batch in zip(prepared.reference, prepared.checks)
    ]
    batch = prepared.batch if artifact.batch is None else _padded(prepared.batch, artifact.batch)
    latency = module.latency_ms(
        loaded, [t.numpy() for t in batch], runs=prepared.runs, warmup=prepared.warmup, max_seconds=prepared.max_seconds
    )
    before = statistics.median(prepared.latency_before)
    same_batch = int(batch[0].shape[0]) == int(prepared.batch[0].shape[0])
    return {
        "status": "succeeded",
        "file": path.name,
        "format": artifact.format,
        "runtime": artifact.runtime,
        "precision": artifact.precision,
        "bytes": path.stat().st_size,
        "latency_ms": significant(latency),
        "latency_ratio": significant(latency / before) if before > 0 and same_batch else None,
        "batch_shape": list(batch[0].shape),
        "fidelity": output_fidelity(prepared.reference, candidate),
        "notes": list(artifact.notes),
    }


def _run(module: Any, loaded: Any, batch: Inputs, rows: int | None) -> list[torch.Tensor]:
    """The artifact's outputs on ``batch``; an artifact fixed to ``rows`` rows runs it in chunks of
    that many (the last one filled up with repeated rows, which are cut from its outputs)."""
    size = int(batch[0].shape[0])
    step = rows or size
    parts = []
    for start in range(0, size, step):
        chunk = tuple(t[start : start + step] for t in batch)
        real = int(chunk[0].shape[0])
        outputs = module.run(loaded, [t.numpy() for t in (_padded(chunk, rows) if rows else chunk)])
        parts.append([torch.from_numpy(output)[:real] if rows else torch.from_numpy(output) for output in outputs])
    return [torch.cat([part[index] for part in parts]) for index in range(len(parts[0]))]


def _shaped_like(reference: Any, tensors: list[torch.Tensor]) -> Any:
    """A runtime's flat outputs in the structure of the original's (a tuple, a dict, ...), so both are
    compared output by output under the same names."""
    leaves, structure = torch.utils._pytree.tree_flatten(reference)
    flat = iter(tensors)
    return torch.utils._pytree.tree_unflatten(
        [next(flat, None) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], structure
    )


def _padded(batch: Inputs, rows: int) -> Inputs:
    """``batch`` with exactly ``rows`` rows: cut, or filled up by repeating its rows."""
    size = int(batch[0].shape[0])
    if size >= rows:
        return tuple(t[:rows] for t in batch)
    repeats = -(-rows // size)
    return tuple(torch.cat([t] * repeats)[:rows] for t in batch)
