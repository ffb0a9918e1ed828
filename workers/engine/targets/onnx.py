"""ONNX: the float model exported by torch, made int8 by onnxruntime's own quantizer, run on onnxruntime.

- Export: a TorchScript model through the TorchScript exporter (``dynamo=False``, opset 17, the batch
  axis of every input and output dynamic); a ``.pt2`` program through the dynamo exporter (its
  dynamic dimensions kept, a fixed batch stays fixed).
- int8: ``quant_pre_process`` (shape inference and graph clean-up: ``quantize_dynamic`` refuses the
  dynamo exporter's graphs without it), then ``quantize_static`` in QDQ form (int8 weights,
  per channel when asked, uint8 activations calibrated by min/max on the job's calibration
  batches) or ``quantize_dynamic`` (``MatMulInteger``/``ConvInteger`` with ``DynamicQuantizeLinear``).

``load``, ``run`` and ``latency_ms`` need only onnxruntime and numpy (the runner's process); torch is
imported by ``export`` alone.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpress.formats import EXPORTED
from workers.engine.errors import TargetFailed, summarize_torch_error
from workers.engine.targets.common import Artifact, TargetRequest, median_latency_ms, runtime_version

if TYPE_CHECKING:
    import numpy

NAME = "onnx"
OPSET = 17  # the TorchScript exporter's; the dynamo exporter picks its own (20 in torch 2.14)


def export(request: TargetRequest, directory: Path) -> Artifact:
    """Write ``model.onnx`` (float32, or int8 by onnxruntime's quantizer) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mp-onnx-") as scratch:
        float_path = Path(scratch) / "float.onnx"
        batch = write_float(request, float_path)
        if request.quantize is None:
            float_path.replace(path)
        else:
            notes += _quantize(request, float_path, path, Path(scratch))
    loaded = load(path)  # onnxruntime must accept what it will be asked to run
    _check_runs(loaded, request)
    return Artifact(
        NAME,
        path,
        "onnx",
        runtime_version("onnxruntime"),
        request.precision,
        request.inputs,
        batch,
        notes + [f"operators: {', '.join(operator_types(path))}"],
    )


def write_float(request: TargetRequest, path: Path) -> int | None:
    """Export the request's float model to ONNX at ``path``; return its fixed batch, None if dynamic.

    Shared with the OpenVINO target, which converts this file."""
    import torch

    outputs = tuple(f"output_{i}" for i in range(_output_count(request)))
    output_names = request.output_names or outputs
    try:
        with _quiet_exporters():
            if request.format_name == EXPORTED:
                from workers.engine.targets.source import fixed_rows

                program = torch.onnx.export(
                    request.model,
                    request.example,
                    input_names=list(request.inputs),
                    output_names=list(output_names),
                    dynamo=True,
                    verbose=False,
                )
                program.save(str(path), external_data=False)
                return fixed_rows(request)
            dynamic = {name: {0: "batch"} for name in (*request.inputs, *output_names)}
            torch.onnx.export(
                request.model,
                request.example,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(request.inputs),
                output_names=list(output_names),
                dynamic_axes=dynamic,
            )
            return None
    except Exception as error:
        raise TargetFailed(
            NAME, f"torch's ONNX exporter could not export the model: {summarize_torch_error(error)}"
        ) from None


def load(path: str | Path) -> Any:
    """An onnxruntime session on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the quantized graphs' initializer notices are noise
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(loaded: Any, inputs: Sequence[numpy.ndarray]) -> list[numpy.ndarray]:
    """Run the session on positional inputs; the outputs in the graph's order."""
    feed = {spec.name: value for spec, value in zip(loaded.get_inputs(), inputs)}
    return list(loaded.run(None, feed))


def latency_ms(
    loaded: Any, inputs: Sequence[numpy.ndarray], runs: int = 20, warmup: int = 3, max_seconds: float | None = None
) -> float:
    """Median wall time of ``run`` (the statistic of ``engine.measure``)."""
    return median_latency_ms(run, loaded, inputs, runs, warmup, max_seconds)


def operator_types(path: str | Path) -> list[str]:
    """The ONNX operator types of the file's graph, sorted (QuantizeLinear, MatMulInteger, ...)."""
    import onnx

    return sorted({node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node})


# ---------------------------------------------------------------------------- helpers


def _quantize(request: TargetRequest, source: Path, path: Path, scratch: Path) -> list[str]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = scratch / "prepared.onnx"
    try:
        with _quiet_exporters():
            quant_pre_process(str(source), str(prepared))
            if request.quantize == "dynamic":
                quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8, per_channel=request.per_channel)
                return ["onnxruntime quantize_dynamic: int8 weights, activations quantized at run time"]
            quantize_static(
                str(prepared),
                str(path),
                _Calibration(request),
                quant_format=QuantFormat.QDQ,
                per_channel=request.per_channel,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
            )
    except TargetFailed:
        raise
    except Exception as error:
        raise TargetFailed(NAME, f"onnxruntime's quantizer failed: {summarize_torch_error(error)}") from None
    return [
        f"onnxruntime quantize_static (QDQ): int8 weights ({'per channel' if request.per_channel else 'per tensor'}),"
        f" uint8 activations calibrated (min/max) on {len(request.calibration)} batches"
    ]


class _Calibration:
    """onnxruntime's CalibrationDataReader over the request's calibration batches, as numpy arrays."""

    def __init__(self, request: TargetRequest) -> None:
        from workers.engine.targets.source import fixed_rows, numpy_batches

        self._batches = iter(
            [dict(zip(request.inputs, batch)) for batch in numpy_batches(request.calibration, fixed_rows(request))]
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def __iter__(self) -> Iterator[dict]:
        return self._batches


def _check_runs(loaded: Any, request: TargetRequest) -> None:
    try:
        run(loaded, [tensor.detach().cpu().numpy() for tensor in request.example])
    except Exception as error:
        raise TargetFailed(NAME, f"onnxruntime could not run the exported model: {str(error).strip()[:300]}") from None


def _output_count(request: TargetRequest) -> int:
    import torch

    from workers.engine.targets.source import runnable

    with torch.no_grad():
        output = runnable(request)(*request.example)
    return len([leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)])


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' deprecation warnings, progress lines and the quantizer's advice (logged through
    the root logger) say nothing to a job's user."""
    import logging

    from workers.engine.torchscript_graph import quiet_torchscript_warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with quiet_torchscript_warnings(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
