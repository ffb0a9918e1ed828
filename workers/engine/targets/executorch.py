"""ExecuTorch: a ``.pte`` program lowered to the XNNPACK delegate, run on ExecuTorch's runtime.

- Export: ``torch.export`` for the example's shapes (``source.exported_program``; TorchScript through
  torch's TorchScript-to-export converter): an ExecuTorch program plans its memory for fixed
  shapes, so the artifact runs batches of the example's size only (``Artifact.batch``).
- int8: PT2E with ExecuTorch's ``XNNPACKQuantizer`` (symmetric int8, weights per channel when
  asked; always for dynamic, the only form XNNPACK runs): ``prepare_pt2e``, the job's calibration batches regrouped to that batch size (static) or
  the example once (dynamic: activations quantized at run time), ``convert_pt2e``, export again.
- Lowering: ``to_edge_transform_and_lower`` with ``XnnpackPartitioner``, ``to_executorch``; the
  operators XNNPACK does not take run on ExecuTorch's portable kernels (listed in the notes).

``load``/``run`` use ``executorch.runtime`` (the job, which has torch loaded anyway). ExecuTorch's Python
bindings (executorch 1.5) link libtorch and import torch, so a process without torch runs the
program on ExecuTorch's C++ runtime instead: ``pte_run`` (``deploy/executorch/pte_run.cpp``, built by
``make pte-runner`` against the wheel's own ``lib/``, none of which links libtorch), the same runtime
a phone or board runs. ``load`` picks it when torch is not imported and the binary exists
(``$PTE_RUN``, default ``var/bin/pte_run``); inputs and outputs cross as ``.npy`` files.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.engine.errors import TargetFailed, summarize_torch_error
from workers.engine.targets.common import Artifact, TargetRequest, median_latency_ms, runtime_version

if TYPE_CHECKING:
    import numpy

NAME = "executorch"
DELEGATE = "executorch_call_delegate"
_UPSAMPLING = ("upsample", "index")  # ops a bilinear upsampling is made of


def export(request: TargetRequest, directory: Path) -> Artifact:
    """Write ``model.pte`` (float32, or int8 by PT2E and the XNNPACK quantizer) into ``directory``."""
    import torch

    from workers.engine.targets.source import exported_program
    from workers.engine.torchscript_graph import quiet_torchscript_warnings

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pte"
    program = exported_program(request, NAME)
    notes: list[str] = []
    with torch.no_grad(), quiet_torchscript_warnings():
        if request.quantize is not None:
            program, quantized = _quantize(program, request)
            per_channel = request.per_channel or request.quantize == "dynamic"
            notes.append(
                f"PT2E with the XNNPACK quantizer ({request.quantize}, weights "
                f"{'per channel' if per_channel else 'per tensor'}): {quantized} quantize operators"
            )
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            with _bilinear_search_only_where_upsampling(program):
                edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            left = _operators_outside_delegate(edge.exported_program().graph_module)
            path.write_bytes(edge.to_executorch().buffer)
        except Exception as error:
            raise TargetFailed(
                NAME, f"lowering to ExecuTorch (XNNPACK) failed: {summarize_torch_error(error)}"
            ) from None
    delegated = left.pop(DELEGATE, 0)
    notes.append(
        f"XNNPACK delegate calls: {delegated}; operators on portable kernels: {', '.join(sorted(left)) or 'none'}"
    )
    loaded = load(path)
    try:
        run(loaded, [tensor.detach().cpu().numpy() for tensor in request.example])
    except Exception as error:
        raise TargetFailed(
            NAME, f"the ExecuTorch runtime could not run the program: {summarize_torch_error(error)}"
        ) from None
    batch = int(request.example[0].shape[0]) if request.example[0].dim() else None
    return Artifact(
        NAME, path, "executorch-pte", runtime_version("executorch"), request.precision, request.inputs, batch, notes
    )


@dataclass(frozen=True)
class LoadedProgram:
    program: Any  # held: the method's memory belongs to the program
    method: Any


@dataclass(frozen=True)
class NativeProgram:
    """A ``.pte`` run by the ``pte_run`` binary (ExecuTorch's C++ runtime, no torch), one process per call."""

    path: Path
    binary: Path

    def call(
        self, inputs: Sequence[numpy.ndarray], runs: int = 0, warmup: int = 0
    ) -> tuple[list[numpy.ndarray], float | None]:
        """The outputs of one run, and the median of ``runs`` timed runs after ``warmup`` (None without runs)."""
        import numpy as np

        with tempfile.TemporaryDirectory(prefix="pte-run-") as scratch:
            names = []
            for index, value in enumerate(inputs):
                names.append(os.path.join(scratch, f"input_{index}.npy"))
                np.save(names[-1], np.ascontiguousarray(value))
            done = subprocess.run(
                [
                    str(self.binary),
                    str(self.path),
                    "--out",
                    scratch,
                    "--runs",
                    str(runs),
                    "--warmup",
                    str(warmup),
                    *names,
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"pte_run failed: {done.stderr.strip()[-500:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            outputs = [
                np.load(os.path.join(scratch, entry["file"]), allow_pickle=False) for entry in summary["outputs"]
            ]
        return outputs, summary["latency_ms"]


def native_runner() -> Path | None:
    """The ``pte_run`` binary (``$PTE_RUN``, default ``var/bin/pte_run`` of the checkout) when it exists."""
    binary = Path(os.environ.get("PTE_RUN") or Path(__file__).resolve().parents[3] / "var" / "bin" / "pte_run")
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def load(path: str | Path) -> LoadedProgram | NativeProgram:
    """The program's ``forward`` method, loaded by ExecuTorch's runtime (XNNPACK registered): through
    the Python bindings where torch is loaded, else through ``pte_run`` when it is built."""
    binary = native_runner()
    if "torch" not in sys.modules and binary is not None:
        return NativeProgram(Path(path), binary)
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(path))
    return LoadedProgram(program, program.load_method("forward"))


def run(loaded: LoadedProgram | NativeProgram, inputs: Sequence[numpy.ndarray]) -> list[numpy.ndarray]:
    """Run ``forward`` on positional inputs; its outputs in order, as numpy arrays."""
    if isinstance(loaded, NativeProgram):
        return loaded.call(inputs)[0]
    import numpy as np
    import torch

    outputs = loaded.method.execute([torch.from_numpy(np.ascontiguousarray(value)) for value in inputs])
    return [
        output.detach().numpy().copy() if isinstance(output, torch.Tensor) else np.asarray(output) for output in outputs
    ]


def latency_ms(
    loaded: LoadedProgram | NativeProgram,
    inputs: Sequence[numpy.ndarray],
    runs: int = 20,
    warmup: int = 3,
    max_seconds: float | None = None,
) -> float:
    """Median wall time of ``run`` (the statistic of ``engine.measure``); ``pte_run`` times inside its
    own process (no file round trips), with the same count of runs."""
    if isinstance(loaded, NativeProgram):
        return float(loaded.call(inputs, runs=max(runs, 1), warmup=warmup)[1])
    return median_latency_ms(run, loaded, inputs, runs, warmup, max_seconds)


# ---------------------------------------------------------------------------- helpers


def _quantize(program: Any, request: TargetRequest) -> tuple[Any, int]:
    """PT2E on the program's module; the quantized module exported again, with its count of quantize ops."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from workers.engine.targets.source import torch_batches

    dynamic = request.quantize == "dynamic"
    # XNNPACK runs dynamic int8 Linear with per-channel weights only: per-tensor leaves
    # choose_qparams/quantize outside the delegate, and ExecuTorch has no portable kernel for them.
    config = get_symmetric_quantization_config(is_per_channel=request.per_channel or dynamic, is_dynamic=dynamic)
    rows = int(request.example[0].shape[0])
    batches = torch_batches(request.calibration, rows) if request.quantize == "static" else [request.example]
    try:
        prepared = prepare_pt2e(program.module(), xnnpack_quantizer(config))
        for batch in batches:
            prepared(*batch)
        converted = convert_pt2e(prepared)
        quantized = sum(
            1
            for node in converted.graph.nodes
            if node.op == "call_function"
            and "quantize_per" in str(node.target)
            and "dequantize" not in str(node.target)
        )
        return torch.export.export(converted, tuple(request.example)), quantized
    except Exception as error:
        raise TargetFailed(NAME, f"PT2E quantization for XNNPACK failed: {summarize_torch_error(error)}") from None


@contextlib.contextmanager
def _bilinear_search_only_where_upsampling(program: Any) -> Iterator[None]:
    """XNNPACK's ``ConvertToUpsampleBilinear2d`` pass builds its pattern graphs (four exports and
    edge lowerings, 5 CPU seconds, once a process: once a job) before it looks at the graph. The
    patterns match bilinear upsampling only (``upsample_bilinear2d``, or the ``index`` ops a
    decomposed one is made of): a graph with neither skips the search and runs the rest of the pass."""
    from executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d import ConvertToUpsampleBilinear2d
    from executorch.backends.xnnpack._passes.xnnpack_pass import XNNPACKPass
    from torch.fx.passes.infra.pass_base import PassResult

    if any(
        word in str(node.target) for node in program.graph.nodes if node.op == "call_function" for word in _UPSAMPLING
    ):
        yield
        return
    search = ConvertToUpsampleBilinear2d.call

    def without_search(self: Any, graph_module: Any) -> Any:
        graph_module.recompile()
        return PassResult(XNNPACKPass.call(self, graph_module).graph_module, True)

    ConvertToUpsampleBilinear2d.call = without_search
    try:
        yield
    finally:
        ConvertToUpsampleBilinear2d.call = search


def xnnpack_quantizer(config: Any) -> Any:
    """ExecuTorch's ``XNNPACKQuantizer`` for ``config``, not searching for conv-BatchNorm patterns in a graph
    that has no BatchNorm left.

    ``prepare_pt2e`` folds every conv-BatchNorm pair before it annotates, yet the quantizer's static
    config still annotates its four conv-bn patterns (QAT's), and each exports its pattern graphs
    again: 7 of the 12 CPU seconds of a small CNN's int8 lowering. Those patterns match a BatchNorm
    node only, so with none left (checked after the fold) leaving them out changes no annotation."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    quantizer = XNNPACKQuantizer().set_global(config)
    transform = quantizer.transform_for_annotation

    def transform_for_annotation(model: Any) -> Any:
        model = transform(model)
        if not any(node.op == "call_function" and "batch_norm" in str(node.target) for node in model.graph.nodes):
            quantizer.SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if "_bn" not in p.name]
        return model

    quantizer.transform_for_annotation = transform_for_annotation
    return quantizer


def _operators_outside_delegate(graph_module: Any) -> Counter[str]:
    """The call_function targets of the lowered graph: delegate calls, and what XNNPACK left out."""
    counts: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and "getitem" not in str(node.target):
            name = getattr(node.target, "__name__", str(node.target))
            counts[DELEGATE if DELEGATE in name else name] += 1
    return counts
