"""Measurements shared by every method: size, parameter count, latency, output fidelity and comparison."""

from __future__ import annotations

import functools
import statistics
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from workers.engine.errors import InvalidInput, OutOfMemory, is_out_of_memory, summarize_torch_error
from workers.engine.inputs import describe
from workers.engine.outputs import named_outputs
from workers.engine.torchscript_graph import quiet_torchscript_warnings, tensor_constants

Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # one tensor, or one per positional input


def count_parameters(model: torch.jit.ScriptModule) -> int:
    """Stored tensor elements: parameters and buffers, or the constants of a frozen model.

    Freezing moves weights into graph constants (packed int8 weights among them), so
    both forms are counted the same way to keep before/after comparable.
    """
    stored = [*model.parameters(), *model.buffers()]
    if isinstance(model, torch.fx.GraphModule):  # a program's module: PT2E's int8 weights are plain attributes
        stored += [
            value
            for value in (
                functools.reduce(getattr, node.target.split("."), model)
                for node in model.graph.nodes
                if node.op == "get_attr"
            )
            if isinstance(value, torch.Tensor)
        ]
    # Once per storage: a weight tied to another (a language model's input and output embedding) is one tensor.
    elements = sum(
        {
            (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()): t.numel() for t in stored if t.numel()
        }.values()
    )
    if elements:
        return elements
    with quiet_torchscript_warnings():
        graph = model.graph
    seen: set[int] = set()
    for _, tensor in tensor_constants(graph):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            elements += tensor.numel()
    for node in graph.findAllNodes("prim::Constant"):
        value = node.output()
        if "LinearPackedParamsBase" in str(value.type()):
            weight, bias = torch.ops.quantized.linear_unpack(value.toIValue())
            elements += weight.numel() + (bias.numel() if bias is not None else 0)
    return elements


def count_macs(model: torch.jit.ScriptModule, batch: Inputs) -> int:
    """Multiply-accumulates of one forward pass on ``batch``: convolutions and matrix multiplies (FLOPs / 2).

    Counted by a dispatch mode, not torch.profiler: starting the profiler initialises Kineto, which
    probes for GPUs and prints "gpuGetDeviceCount failed" on machines with a CUDA build of torch and
    no usable GPU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), quiet_torchscript_warnings(), FlopCounterMode(display=False) as counter:
        model(*as_args(batch))
    return int(counter.get_total_flops() // 2)


def as_args(batch: Inputs) -> tuple[torch.Tensor, ...]:
    """Positional arguments of forward: a lone tensor is one input."""
    return (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)


def run_model(model: torch.jit.ScriptModule, batch: Inputs) -> Any:
    """Run once without gradients; turn a shape or dtype mismatch into ``InvalidInput``."""
    args = as_args(batch)
    try:
        with torch.no_grad(), quiet_torchscript_warnings():
            return model(*args)
    except Exception as error:
        if is_out_of_memory(error):
            raise OutOfMemory(summarize_torch_error(error)) from None
        raise InvalidInput(f"the model failed on {describe(args)}: {summarize_torch_error(error)}") from None


def median_latency_ms(model: torch.jit.ScriptModule, batch: Inputs, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``runs`` forward passes after ``warmup`` (TorchScript optimises on early calls)."""
    return statistics.median(latency_samples_ms(model, batch, runs=runs, warmup=warmup))


def latency_samples_ms(
    model: torch.jit.ScriptModule, batch: Inputs, runs: int = 20, warmup: int = 3, max_seconds: float | None = None
) -> list[float]:
    """Wall times of up to ``runs`` forward passes after up to ``warmup`` untimed ones.

    With ``max_seconds`` the whole measurement stops once that much time is spent (a 2 GB model
    takes about a second a pass on two cores), after at least one timed pass.
    """
    args = as_args(batch)
    start = time.perf_counter()
    deadline = start + max_seconds if max_seconds is not None else float("inf")
    warm_until = start + max_seconds / 2 if max_seconds is not None else float("inf")  # half the budget is for timing
    with torch.no_grad(), quiet_torchscript_warnings():
        for _ in range(warmup):
            if time.perf_counter() >= warm_until:
                break
            model(*args)
        timings: list[float] = []
        for _ in range(runs):
            began = time.perf_counter()
            model(*args)
            timings.append((time.perf_counter() - began) * 1000.0)
            if time.perf_counter() >= deadline:
                break
    return timings


def output_fidelity(reference: Iterable[Any], candidate: Iterable[Any]) -> dict[str, Any]:
    """Compare outputs batch by batch, overall and per output: max |a-b|, cosine similarity, and
    top-1 agreement of 2-D float scores.

    Outputs are tensors, or tuples, lists and dicts of them (``outputs.py`` names them). The
    overall figures treat all outputs as one vector; ``top1_agreement`` is the first output's.
    """
    names: list[str] | None = None
    per_output: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for ref, cand in zip(reference, candidate):
        ref_named, cand_named = named_outputs(ref), named_outputs(cand)
        if [n for n, _ in ref_named] != [n for n, _ in cand_named] or any(
            a.shape != b.shape for (_, a), (_, b) in zip(ref_named, cand_named)
        ):
            raise InvalidInput(
                "the compressed model's outputs have different shapes from the original's: "
                f"{_shapes(ref_named)} vs {_shapes(cand_named)}"
            )
        names = names or [name for name, _ in ref_named]
        for (name, a), (_, b) in zip(ref_named, cand_named):
            per_output.setdefault(name, ([], []))
            per_output[name][0].append(a.detach())
            per_output[name][1].append(b.detach())
    outputs = [
        {
            "name": name,
            "shape": list(refs[0].shape),
            "dtype": str(refs[0].dtype).removeprefix("torch."),
            **_compare(refs, cands),
        }
        for name, (refs, cands) in per_output.items()
    ]
    a = (
        torch.cat([t.float().flatten() for refs, _ in per_output.values() for t in refs])
        if per_output
        else torch.zeros(0)
    )
    b = (
        torch.cat([t.float().flatten() for _, cands in per_output.values() for t in cands])
        if per_output
        else torch.zeros(0)
    )
    return {
        **_similarity(a, b),
        "top1_agreement": outputs[0]["top1_agreement"] if outputs else None,
        "outputs": outputs,
    }


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in order: the tensor leaves of its pytree (tensors, and
    tuples, lists, dicts and other registered containers of them; a dict in its own key order)."""
    return [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def output_differences(expected: Any, got: Any) -> list[tuple[torch.Tensor, torch.Tensor, float, float]] | None:
    """The tensors of two outputs paired in order (``output_tensors``), each pair with max
    |expected - got| and max |expected| (both 0.0 for empty tensors); None when the outputs differ
    in the number or the shapes of their tensors. Callers choose the scale and the tolerance."""
    want, have = output_tensors(expected), output_tensors(got)
    if len(want) != len(have) or any(a.shape != b.shape for a, b in zip(want, have)):
        return None
    return [(a, b, *_largest_difference(a, b)) for a, b in zip(want, have)]


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    if not a.numel():
        return 0.0, 0.0
    if not (a.is_floating_point() or a.is_complex()):  # integers and bools: in float64, without wrapping around
        a, b = a.double(), b.double()
    return float((a - b).abs().max()), float(a.abs().max())


def _compare(refs: list[torch.Tensor], cands: list[torch.Tensor]) -> dict[str, Any]:
    a = torch.cat([t.float().flatten() for t in refs])
    b = torch.cat([t.float().flatten() for t in cands])
    top1 = None
    if all(r.dim() == 2 and r.shape[1] > 1 and r.is_floating_point() for r in refs):
        agree = sum(int((r.argmax(1) == c.argmax(1)).sum()) for r, c in zip(refs, cands))
        top1 = agree / sum(r.shape[0] for r in refs)
    return {**_similarity(a, b), "top1_agreement": top1}


def _similarity(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max |a-b| and the cosine of a and b; identical outputs have cosine 1.0 (two zero vectors,
    such as a classifier head initialised to zeros, would otherwise give 0.0: "collapsed")."""
    error = float((a - b).abs().max()) if a.numel() else 0.0
    identical = error == 0.0 and bool(torch.equal(a, b))  # NaN != NaN: never identical
    cosine = 1.0 if identical else float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))
    return {"max_abs_error": error, "cosine_similarity": cosine}


DEFLATE_SAMPLE_CHUNKS = 64  # files above this many MB get an estimated deflate size


def significant(value: float, digits: int = 5) -> float:
    """Round to significant digits, not decimals: a 0.0015 ratio keeps its precision."""
    return float(f"{value:.{digits}g}")


def deflate_bytes(path: Path) -> tuple[int, bool]:
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


def _shapes(named: list[tuple[str, torch.Tensor]]) -> list[list[int]]:
    return [list(t.shape) for _, t in named]
