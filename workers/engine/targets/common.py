"""What every target shares: the request (what to export), the artifact (what came out), and the
latency statistic on a target's own runtime.

Torch-free at import: the runner (``targets.runner``) loads artifacts through this module in a
process that never imports torch. The request holds torch objects, named here only as annotations.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing torch here would put it in the runner's process
    import numpy
    import torch

QUANTIZE_MODES = (None, "dynamic", "static")


@dataclass(frozen=True)
class TargetRequest:
    """What a target exports: the job's compressed model before int8 (each target quantizes with its
    own tooling), one example batch, and the calibration batches the job's own static int8 used.

    ``model``: a ``torch.jit.ScriptModule`` (``format_name`` ``modelpress.formats.TORCHSCRIPT``) or a
    ``torch.export.ExportedProgram`` (``EXPORTED``). ``quantize``: None keeps float32; ``"dynamic"``:
    int8 weights, activations quantized at run time (OpenVINO: int8 weights only); ``"static"``:
    int8 weights and activations, ranges calibrated on ``calibration``. ``per_channel``: one weight
    scale per output channel rather than one per tensor.
    """

    model: Any
    format_name: str
    example: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    quantize: str | None = None
    per_channel: bool = True
    input_names: tuple[str, ...] | None = None  # default: input_0, input_1, ... (the runner's names)
    output_names: tuple[str, ...] | None = None  # default: output_0, output_1, ...

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, not {self.quantize!r}")
        if self.quantize == "static" and not self.calibration:
            raise ValueError("static int8 needs calibration batches")

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.input_names or tuple(f"input_{i}" for i in range(len(self.example)))

    @property
    def precision(self) -> str:
        return {None: "float32", "dynamic": "int8-dynamic", "static": "int8"}[self.quantize]


@dataclass(frozen=True)
class Artifact:
    """One exported file and how to run it.

    ``format``: ``onnx``, ``openvino-ir`` (a zip holding ``model.xml`` and ``model.bin``) or
    ``executorch-pte``. ``runtime``: the runtime it was checked on, with its version
    (``onnxruntime 1.31.1``). ``precision``: ``float32``, ``int8`` (weights and activations),
    ``int8-dynamic`` (int8 weights, activations quantized at run time) or ``int8-weights``
    (weights only). ``batch``: the batch size the file is fixed to, None when any batch runs.
    """

    target: str
    path: Path
    format: str
    runtime: str
    precision: str
    input_names: tuple[str, ...]
    batch: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def latency_samples_ms(
    call: Callable[[], Any], runs: int = 20, warmup: int = 3, max_seconds: float | None = None
) -> list[float]:
    """Wall times of up to ``runs`` calls after up to ``warmup`` untimed ones: the statistic of
    ``engine.measure.latency_samples_ms`` (half of ``max_seconds`` at most for warming up, then
    timing until the budget is spent, after at least one timed call), without torch."""
    start = time.perf_counter()
    deadline = start + max_seconds if max_seconds is not None else float("inf")
    warm_until = start + max_seconds / 2 if max_seconds is not None else float("inf")
    for _ in range(warmup):
        if time.perf_counter() >= warm_until:
            break
        call()
    timings: list[float] = []
    for _ in range(runs):
        began = time.perf_counter()
        call()
        timings.append((time.perf_counter() - began) * 1000.0)
        if time.perf_counter() >= deadline:
            break
    return timings


def median_latency_ms(
    run: Callable[[Any, Sequence[numpy.ndarray]], Any],
    loaded: Any,
    inputs: Sequence[numpy.ndarray],
    runs: int = 20,
    warmup: int = 3,
    max_seconds: float | None = None,
) -> float:
    """Median of ``latency_samples_ms`` for ``run(loaded, inputs)``: a target module's ``run``."""
    return statistics.median(latency_samples_ms(lambda: run(loaded, inputs), runs, warmup, max_seconds))


def runtime_version(distribution: str) -> str:
    """``"<distribution> <version>"`` from the installed package's metadata (no import of it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{distribution} {version(distribution)}"
    except PackageNotFoundError:
        return distribution


@contextlib.contextmanager
def tool_home() -> Iterator[None]:
    """A ``HOME`` for the tools that look one up (OpenVINO's and NNCF's telemetry keep a consent file
    there; ``Path.home()`` raises without it). A job's sandboxed process has none and no user
    database to find one in, so a scratch one is set for the export and removed after: nothing the
    tools write there outlives it, and the job's environment stays as the sandbox made it."""
    if os.environ.get("HOME"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="modelpress-home-") as home:
        os.environ["HOME"] = home
        try:
            yield
        finally:
            os.environ.pop("HOME", None)
