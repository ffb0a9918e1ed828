"""Measurements shared by every method: size, parameter count, latency, output fidelity."""
from __future__ import annotations

import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import InvalidInput, OutOfMemory, summarize_torch_error
from .torchscript import quiet_torchscript_warnings, tensor_constants


def count_parameters(model: torch.jit.ScriptModule) -> int:
    """Stored tensor elements: parameters and buffers, or the constants of a frozen model.

    Freezing moves weights into graph constants (packed int8 weights among them), so
    both forms are counted the same way to keep before/after comparable.
    """
    elements = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
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


def count_macs(model: torch.jit.ScriptModule, batch: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``batch``: conv and matrix-multiply ops, as torch.profiler counts them."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), quiet_torchscript_warnings(), profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        model(batch)
    flops = sum(event.flops for event in prof.key_averages()
                if event.flops and ("conv" in event.key or "mm" in event.key or "linear" in event.key))
    return int(flops // 2)


def run_model(model: torch.jit.ScriptModule, batch: torch.Tensor) -> Any:
    """Run once without gradients; turn a shape or dtype mismatch into ``InvalidInput``."""
    try:
        with torch.no_grad(), quiet_torchscript_warnings():
            return model(batch)
    except Exception as error:
        if isinstance(error, MemoryError) or "can't allocate memory" in str(error):
            raise OutOfMemory(summarize_torch_error(error)) from None
        raise InvalidInput(
            f"the model failed on an input of shape {list(batch.shape)} ({batch.dtype}): {summarize_torch_error(error)}"
        ) from None


def median_latency_ms(model: torch.jit.ScriptModule, batch: torch.Tensor, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``runs`` forward passes after ``warmup`` (TorchScript optimises on early calls)."""
    with torch.no_grad(), quiet_torchscript_warnings():
        for _ in range(warmup):
            model(batch)
        timings = []
        for _ in range(runs):
            start = time.perf_counter()
            model(batch)
            timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def output_fidelity(reference: Iterable[Any], candidate: Iterable[Any]) -> dict[str, Any]:
    """Compare outputs batch by batch: max |a-b|, cosine similarity, top-1 agreement of 2-D scores."""
    ref_tensors, cand_tensors = [], []
    for ref, cand in zip(reference, candidate):
        ref_flat, cand_flat = _tensors(ref), _tensors(cand)
        if len(ref_flat) != len(cand_flat) or any(a.shape != b.shape for a, b in zip(ref_flat, cand_flat)):
            raise InvalidInput(
                "the compressed model's outputs have different shapes from the original's: "
                f"{[list(t.shape) for t in ref_flat]} vs {[list(t.shape) for t in cand_flat]}"
            )
        ref_tensors.append(ref_flat)
        cand_tensors.append(cand_flat)
    a = torch.cat([t.detach().float().flatten() for batch in ref_tensors for t in batch])
    b = torch.cat([t.detach().float().flatten() for batch in cand_tensors for t in batch])
    result: dict[str, Any] = {
        "max_abs_error": float((a - b).abs().max()) if a.numel() else 0.0,
        "cosine_similarity": float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12)) if a.numel() else 1.0,
        "top1_agreement": None,
    }
    firsts = [(batch[0], other[0]) for batch, other in zip(ref_tensors, cand_tensors) if batch]
    if firsts and all(r.dim() == 2 and r.shape[1] > 1 and r.is_floating_point() for r, _ in firsts):
        agree = sum(int((r.argmax(1) == c.argmax(1)).sum()) for r, c in firsts)
        total = sum(r.shape[0] for r, _ in firsts)
        result["top1_agreement"] = agree / total
    return result


def significant(value: float, digits: int = 5) -> float:
    """Round to significant digits, not decimals: a 0.0015 ratio keeps its precision."""
    return float(f"{value:.{digits}g}")


def deflate_bytes(path: Path) -> int:
    """Size after deflate (zlib level 6): what zeros from unstructured pruning save in transit and storage."""
    compressor = zlib.compressobj(6)
    total = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _tensors(output[key])]
    return []
