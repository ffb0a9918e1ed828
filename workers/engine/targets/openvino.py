"""OpenVINO IR: the float ONNX file (``targets.onnx.write_float``) converted by ``openvino.convert_model``,
made int8 by NNCF, run on OpenVINO's CPU plugin.

- Static int8: ``nncf.quantize`` on the job's calibration batches (FakeQuantize on activations and
  weights, weights stored as int8 constants; NNCF's default recipe for the CPU: symmetric per-channel
  weights, fast bias correction). ``per_channel`` False asks NNCF for per-tensor weight scales.
- Dynamic: ``nncf.compress_weights`` (int8 symmetric, per output channel, whatever ``per_channel``
  says): int8 weights decompressed on the fly, activations stay float (precision ``int8-weights``).
  OpenVINO has no ONNX-style dynamic activation quantization; its CPU plugin may quantize
  activations of such layers at run time itself (``DYNAMIC_QUANTIZATION_GROUP_SIZE``), left at its
  default.

Converted from ONNX rather than from torch so both model formats take one route (``convert_model``
takes neither a ScriptModule nor every ``.pt2`` program). The artifact is one zip file,
``model.openvino.zip``, holding ``model.xml`` and ``model.bin`` (stored, not deflated); ``load``
reads both from the zip into memory, nothing is extracted. ``load``, ``run`` and ``latency_ms``
need only openvino and numpy.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.engine.errors import TargetFailed, summarize_torch_error
from workers.engine.targets.common import Artifact, TargetRequest, median_latency_ms, runtime_version

if TYPE_CHECKING:
    import numpy

NAME = "openvino"
MEMBERS = ("model.xml", "model.bin")


def export(request: TargetRequest, directory: Path) -> Artifact:
    """Write ``model.openvino.zip`` (the IR's .xml and .bin) into ``directory``."""
    import openvino

    from workers.engine.targets.onnx import write_float

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.openvino.zip"
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mp-openvino-") as scratch:
        source = Path(scratch) / "float.onnx"
        batch = write_float(request, source)
        try:
            model = openvino.convert_model(str(source))
        except Exception as error:
            raise TargetFailed(
                NAME, f"openvino.convert_model could not convert the model: {summarize_torch_error(error)}"
            ) from None
        precision = request.precision
        if request.quantize == "static":
            model = _quantize(model, request)
            notes.append(
                f"nncf.quantize: int8 weights ({'per channel' if request.per_channel else 'per tensor'}) "
                f"and activations calibrated on {len(request.calibration)} batches"
            )
        elif request.quantize == "dynamic":
            model, precision = _compress_weights(model), "int8-weights"
            notes.append("nncf.compress_weights: int8 weights (symmetric, per channel), float activations")
        xml = Path(scratch) / "model.xml"
        openvino.save_model(model, str(xml), compress_to_fp16=False)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            for member in MEMBERS:
                archive.write(Path(scratch) / member, member)
    loaded = load(path)
    try:
        run(loaded, [tensor.detach().cpu().numpy() for tensor in request.example])
    except Exception as error:
        raise TargetFailed(NAME, f"OpenVINO could not run the converted model: {str(error).strip()[:300]}") from None
    operations = ir_operations(path)
    int8 = [
        f"{name} x{count}"
        for name, count in sorted(operations.items())
        if name in ("FakeQuantize", "Const:i8", "Const:u8")
    ]
    notes.append(f"int8 operations: {', '.join(int8) or 'none'}")
    return Artifact(NAME, path, "openvino-ir", runtime_version("openvino"), precision, request.inputs, batch, notes)


def load(path: str | Path) -> Any:
    """The IR from the zip, compiled for the CPU plugin, float layers in float32."""
    import numpy as np
    import openvino

    with zipfile.ZipFile(path) as archive:
        xml, weights = (archive.read(member) for member in MEMBERS)
    core = openvino.Core()
    model = core.read_model(xml.decode(), openvino.Tensor(np.frombuffer(weights, dtype=np.uint8).copy()))
    # f32, as exported: on CPUs with bf16 (AVX512-BF16, AMX) the plugin otherwise runs float layers
    # in bfloat16 by default, three significant digits, and a float32 artifact would not be one.
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def run(loaded: Any, inputs: Sequence[numpy.ndarray]) -> list[numpy.ndarray]:
    """Run the compiled model on positional inputs; its outputs in order (copies: OpenVINO reuses
    its output buffers on the next call)."""
    import numpy as np

    result = loaded(list(inputs))
    return [np.array(result[output], copy=True) for output in loaded.outputs]


def latency_ms(
    loaded: Any, inputs: Sequence[numpy.ndarray], runs: int = 20, warmup: int = 3, max_seconds: float | None = None
) -> float:
    """Median wall time of ``run`` (the statistic of ``engine.measure``)."""
    return median_latency_ms(run, loaded, inputs, runs, warmup, max_seconds)


def ir_operations(path: str | Path) -> Counter[str]:
    """How many operations of each type the IR holds, constants counted by element type
    (``FakeQuantize``, ``Const:i8``, ``Const:f32``, ``Convert``, ...), read from ``model.xml``."""
    from xml.etree import ElementTree

    with zipfile.ZipFile(path) as archive:
        root = ElementTree.fromstring(archive.read("model.xml"))
    counts: Counter[str] = Counter()
    for layer in root.iter("layer"):
        kind = layer.get("type", "")
        data = layer.find("data")
        if kind == "Const" and data is not None:
            kind = f"Const:{data.get('element_type')}"
        counts[kind] += 1
    return counts


# ---------------------------------------------------------------------------- helpers


def _quantize(model: Any, request: TargetRequest) -> Any:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    from workers.engine.targets.source import fixed_rows, numpy_batches

    batches = numpy_batches(request.calibration, fixed_rows(request))
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=request.per_channel)
    )
    try:
        with _quiet_nncf():
            return nncf.quantize(
                model, nncf.Dataset(batches, list), subset_size=len(batches), advanced_parameters=advanced
            )
    except Exception as error:
        raise TargetFailed(NAME, f"nncf.quantize failed: {summarize_torch_error(error)}") from None


def _compress_weights(model: Any) -> Any:
    import nncf

    try:
        with _quiet_nncf():
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
    except Exception as error:
        raise TargetFailed(NAME, f"nncf.compress_weights failed: {summarize_torch_error(error)}") from None


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs tables and draws progress bars on stdout: nothing a job's user reads."""
    import logging

    import nncf

    from workers.engine.torchscript_graph import quiet_torchscript_warnings

    logger = logging.getLogger("nncf")
    level = logger.level
    nncf.set_log_level(logging.ERROR)
    try:
        with quiet_torchscript_warnings(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
