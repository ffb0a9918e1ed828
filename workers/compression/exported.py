"""torch.export programs (``.pt2``): load, save, quantize, prune, and the job's run and report.

The program is compressed as a program: weights are rewritten in the exported state dict or in
the unlifted graph (``ExportedProgram.module()``), and the result is re-exported so plain
``torch.export.load`` runs it. The dynamic dimensions of the uploaded program are kept.
"""
from __future__ import annotations

import contextlib
import os
import platform
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.export import Dim, ExportedProgram

from modelpress.formats import EXPORTED, exported_program_problem, is_exported_program

from .artifacts import save_atomically
from .errors import InvalidModel, UnsupportedModel, summarize_torch_error
from .inputs import Dataset, example_batch, fidelity_batches, load_dataset
from .measure import count_parameters, deflate_bytes, median_latency_ms, output_fidelity, run_model, significant
from .torchscript import matching_pattern

Progress = Callable[[str, float], None]

# Smallest weight worth quantizing: below this the int8 copy plus its scales saves almost nothing.
MIN_QUANTIZED_ELEMENTS = 1024
_LINEAR = torch.ops.aten.linear.default
_PRUNABLE_OPS = {  # op -> the module type it stands for in spec.prune.modules
    torch.ops.aten.linear.default: "Linear",
    torch.ops.aten.conv2d.default: "Conv2d",
    torch.ops.aten.convolution.default: "Conv2d",
}


def load_program(path: str | os.PathLike) -> ExportedProgram:
    """Check the archive again (this process may be the first to see the file), then ``torch.export.load``."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise InvalidModel("the model file is not a .pt2 archive: it has no readable zip directory") from None
    problem = exported_program_problem(path, names) if is_exported_program(names) else "not a torch.export archive"
    if problem is not None:
        raise InvalidModel(problem)
    try:
        # The check above refuses every pickle torch would load with weights_only=False; forcing
        # weights_only keeps a second lock on torch.load should a later torch read more pickles.
        with _weights_only_loads(), open(path, "rb") as handle:
            return torch.export.load(handle)
    except Exception as error:
        raise InvalidModel(f"the .pt2 program could not be loaded: {summarize_torch_error(error)}") from None


def save_program(program: ExportedProgram, path: str | os.PathLike) -> int:
    """Save atomically (temp name, then rename); return bytes. torch.export.save wants a name ending .pt2."""
    return save_atomically(path, lambda temp_name: torch.export.save(program, temp_name), suffix=".pt2")


def quantize_program(program: ExportedProgram, spec: Mapping[str, Any], batch: torch.Tensor,
                     progress: Progress) -> tuple[ExportedProgram, dict[str, Any]]:
    """Store the weight of every ``aten.linear`` as int8 (per output channel, symmetric) or float16.

    w ~= q * s with s = max|w_row| / 127. The graph dequantizes at run time (weight-only): the file
    shrinks about 4x (2x for float16); activations stay float, so eager speed is about unchanged.
    """
    exclude = list(spec.get("exclude") or [])
    if "Linear" not in spec.get("modules", ["Linear"]):
        raise UnsupportedModel("on .pt2 programs quantization covers Linear layers; add 'Linear' to quantize.modules")
    int8 = spec.get("dtype", "qint8") == "qint8"
    module = program.module()
    graph = module.graph
    quantized, skipped = [], []
    replaced: dict[str, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _LINEAR:
            continue
        weight_node = node.args[1]
        if not isinstance(weight_node, torch.fx.Node) or weight_node.op != "get_attr":
            skipped.append({"op": node.name, "reason": "the weight is computed in the graph, not stored"})
            continue
        name = weight_node.target
        if name in replaced:
            continue
        weight = _attribute(module, name)
        owner = name.rpartition(".")[0]
        reason = _quantize_skip_reason(weight, owner, exclude)
        if reason:
            skipped.append({"module": owner, "weight": name, "reason": reason})
            continue
        stored = _store_quantized(module, name, weight, int8)
        with graph.inserting_before(weight_node):
            dequantized = _dequantize_nodes(graph, stored, weight.dtype)
        weight_node.replace_all_uses_with(dequantized)
        graph.erase_node(weight_node)
        _delete_attribute(module, name)
        replaced[name] = dequantized
        quantized.append({"module": owner, "weight": name, "kernel": "aten.linear on dequantized weight",
                          "dtype": "int8 per-channel" if int8 else "float16", "shape": list(weight.shape)})
    progress("quantizing", 0.5)
    if not quantized:
        raise UnsupportedModel("no Linear weight of the program could be quantized (" +
                               (", ".join(sorted({s["reason"] for s in skipped})) or "the program has no aten.linear")
                               + ")")
    graph.lint()
    module.recompile()
    exported = _reexport(module, program, batch)
    progress("quantizing", 1.0)
    return exported, {"format": EXPORTED, "mode": "weight-only", "quantized": quantized, "left_float": skipped,
                      "notes": ["weights are stored in int8 with per-output-channel scales and dequantized inside the "
                                "program; activations stay float" if int8 else "weights are stored in float16"]}


def prune_program(program: ExportedProgram, spec: Mapping[str, Any], batch: torch.Tensor,
                  progress: Progress) -> tuple[ExportedProgram, dict[str, Any]]:
    """Zero the smallest-magnitude weights of Linear / Conv2d ops in the program's state dict.

    |w| below the ``amount`` quantile (of all chosen weights with scope ``global``, of each layer's
    with ``per_layer``) becomes 0. The graph is unchanged; zeros shrink the file once compressed.
    """
    if spec.get("structured"):
        raise UnsupportedModel("structured (channel) pruning of .pt2 programs is not available yet; "
                               "use structured: false, or upload the model as TorchScript")
    if spec.get("finetune"):
        raise UnsupportedModel("fine-tuning after pruning is not available for .pt2 programs yet; drop 'finetune'")
    amount = float(spec["amount"])
    modules, exclude = set(spec.get("modules") or _PRUNABLE_OPS.values()), list(spec.get("exclude") or [])
    weights: dict[str, torch.Tensor] = {}
    for node in program.graph.nodes:
        kind = _PRUNABLE_OPS.get(node.target) if node.op == "call_function" else None
        if kind is None or kind not in modules or not isinstance(node.args[1], torch.fx.Node):
            continue
        name = program.graph_signature.inputs_to_parameters.get(node.args[1].name)
        if name is not None and not matching_pattern(name.rpartition(".")[0], exclude):
            weights[name] = program.state_dict[name]
    if not weights:
        raise UnsupportedModel(f"the program has no {' or '.join(sorted(modules))} weight to prune")
    if spec.get("scope", "global") == "global":
        threshold = _magnitude_quantile(torch.cat([w.detach().abs().flatten() for w in weights.values()]), amount)
        thresholds = dict.fromkeys(weights, threshold)
    else:
        thresholds = {name: _magnitude_quantile(w.detach().abs().flatten(), amount) for name, w in weights.items()}
    layers = []
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(weight.abs() > thresholds[name])
            layers.append({"weight": name, "sparsity": round(float((weight == 0).float().mean()), 5)})
    progress("pruning", 1.0)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return program, {"format": EXPORTED, "structured": False, "sparsity": round(zeros / total, 5), "layers": layers,
                     "notes": ["zeros are stored as such: the file shrinks once compressed (see deflate_bytes)"]}


METHODS = {"quantize": quantize_program, "prune": prune_program}


def compress_exported(model_path: str | os.PathLike, spec: Mapping[str, Any], output_path: str | os.PathLike,
                      data_path: str | os.PathLike | None = None, progress: Progress | None = None,
                      student_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The job for a ``.pt2`` upload: load -> method -> save -> reload -> measure -> report (a ``.pt2`` out)."""
    progress = progress or (lambda stage, fraction: None)
    method_name = spec["method"]
    method = METHODS.get(method_name)
    if method is None:
        raise UnsupportedModel(f"method {method_name!r} is not available for .pt2 programs yet "
                               f"({', '.join(METHODS)} are); upload the model as TorchScript for it")
    evaluation = spec.get("evaluation", {})
    runs, warmup = int(evaluation.get("runs", 20)), int(evaluation.get("warmup", 3))

    progress("loading", 0.0)
    original = load_program(model_path).module()
    data: Dataset | None = load_dataset(data_path) if data_path else None
    batch = example_batch(spec, data)
    checks = fidelity_batches(spec, data)
    progress("checking inputs", 0.02)
    reference = [run_model(original, inputs) for inputs in checks]
    run_model(original, batch)

    def method_progress(stage: str, fraction: float) -> None:
        progress(stage, 0.05 + 0.6 * min(max(fraction, 0.0), 1.0))

    compressed, details = method(load_program(model_path), spec.get(method_name, {}), batch, method_progress)
    progress("saving", 0.66)
    output_bytes = save_program(compressed, output_path)
    result = load_program(output_path).module()
    progress("measuring fidelity", 0.7)
    fidelity = output_fidelity(reference, [run_model(result, inputs) for inputs in checks])
    progress("measuring latency", 0.75)
    latency_before = median_latency_ms(original, batch, runs=runs, warmup=warmup)
    progress("measuring latency", 0.87)
    latency_after = median_latency_ms(result, batch, runs=runs, warmup=warmup)
    progress("writing report", 0.99)
    input_bytes = Path(model_path).stat().st_size
    return {
        "method": method_name,
        "format": {"input": EXPORTED, "output": EXPORTED},
        "size": {"bytes_before": input_bytes, "bytes_after": output_bytes,
                 "ratio": significant(output_bytes / input_bytes),
                 "deflate_bytes_before": deflate_bytes(Path(model_path)),
                 "deflate_bytes_after": deflate_bytes(Path(output_path))},
        "parameters": {"before": count_parameters(original), "after": count_parameters(result)},
        "latency": {"before_ms": significant(latency_before), "after_ms": significant(latency_after),
                    "ratio": significant(latency_after / latency_before) if latency_before > 0 else None,
                    "runtime": "eager", "batch_shape": list(batch.shape), "runs": runs, "warmup": warmup,
                    "threads": torch.get_num_threads(), "statistic": "median"},
        "fidelity": {**fidelity, "samples": sum(int(b.shape[0]) if b.dim() else 1 for b in checks),
                     "inputs": "data file" if data is not None else "random normal of input_shape"},
        "accuracy": None,
        "details": details,
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }


# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _quantize_skip_reason(weight: torch.Tensor, owner: str, exclude: list[str]) -> str | None:
    pattern = matching_pattern(owner, exclude)
    if pattern:
        return f"excluded by {pattern!r}"
    if not weight.is_floating_point() or weight.dim() != 2:
        return "not a 2-D float weight"
    if weight.numel() < MIN_QUANTIZED_ELEMENTS:
        return f"fewer than {MIN_QUANTIZED_ELEMENTS} weights"
    return None


def _store_quantized(module: torch.nn.Module, name: str, weight: torch.Tensor, int8: bool) -> tuple[str, str | None]:
    """Register the stored form of ``weight`` as buffers of the root module; return their names."""
    base = "_mp_" + name.replace(".", "_")
    with torch.no_grad():
        if int8:
            scale = (weight.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=torch.finfo(weight.dtype).tiny)
            module.register_buffer(f"{base}_int8", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
            module.register_buffer(f"{base}_scale", scale.to(weight.dtype).contiguous())
            return f"{base}_int8", f"{base}_scale"
        module.register_buffer(f"{base}_fp16", weight.detach().to(torch.float16))
        return f"{base}_fp16", None


def _dequantize_nodes(graph: torch.fx.Graph, stored: tuple[str, str | None], dtype: torch.dtype) -> torch.fx.Node:
    values, scale = stored
    node = graph.call_function(torch.ops.aten._to_copy.default, (graph.get_attr(values),), {"dtype": dtype})
    if scale is not None:
        node = graph.call_function(torch.ops.aten.mul.Tensor, (node, graph.get_attr(scale)))
    return node


def _attribute(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _delete_attribute(module: torch.nn.Module, name: str) -> None:
    owner, _, leaf = name.rpartition(".")
    delattr(module.get_submodule(owner) if owner else module, leaf)


def _reexport(module: torch.nn.Module, original: ExportedProgram, batch: torch.Tensor) -> ExportedProgram:
    """Export the rewritten module again, keeping the dimensions the original program left dynamic."""
    inputs = [node for node in original.graph.nodes if node.op == "placeholder"
              and node.name in original.graph_signature.user_inputs]
    dynamic = tuple({axis: Dim.DYNAMIC for axis, size in enumerate(node.meta["val"].shape)
                     if isinstance(size, torch.SymInt)} or None for node in inputs)
    try:
        return torch.export.export(module, (batch,), dynamic_shapes=dynamic if any(dynamic) else None)
    except Exception as error:
        raise UnsupportedModel(f"the compressed program could not be exported again: {summarize_torch_error(error)}") \
            from None


def _magnitude_quantile(magnitudes: torch.Tensor, amount: float) -> float:
    """The magnitude below which ``amount`` of the values lie (kthvalue: exact, no sort of a copy)."""
    k = int(round(amount * magnitudes.numel()))
    if k <= 0:
        return -1.0
    return float(magnitudes.kthvalue(k).values)


__all__ = ["compress_exported", "load_program", "save_program", "quantize_program", "prune_program"]
