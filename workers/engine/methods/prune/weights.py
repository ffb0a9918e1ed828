"""Unstructured pruning of a TorchScript model: the smallest-magnitude weights set to zero, per
tensor or over all selected tensors at once (``options.scope``), found by counting so that the
extra memory is one tensor's worth. ``methods.prune.torchscript.prune`` calls it for each step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from modelpress.options import PruneOptions
from workers.engine.analysis.channels import layer_name
from workers.engine.torchscript_graph import matching_pattern

PRUNABLE_TYPES = ("Conv2d", "Linear", "Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")


def prune_weights(
    model,
    options: PruneOptions,
    selected,
    exclude,
    types,
    linear_weights: set[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    amount = options.amount
    targets, skipped = {}, []
    for name, parameter in model.named_parameters():
        module = name.rpartition(".")[0]
        module_type = types.get(module, "")
        if name in linear_weights and module_type not in (*PRUNABLE_TYPES, "Embedding", "EmbeddingBag"):
            module, module_type = layer_name(name), "Linear"  # a Conv1D, or a bare parameter read as x @ W
        elif not name.endswith("weight") or parameter.dim() < 2:
            continue
        if module_type not in selected:
            skipped.append({"module": module, "type": module_type, "reason": f"type {module_type} not selected"})
        elif (pattern := matching_pattern(module, exclude)) is not None:
            skipped.append({"module": module, "type": module_type, "reason": f"excluded by pattern {pattern!r}"})
        else:
            targets[name] = parameter
    notes = ["zeros are stored densely: the file keeps its size but compresses well (see deflate bytes)"]
    if not targets:
        notes.insert(0, "nothing prunable: no weight of the selected module types, so the model is returned unchanged")
        return {"structured": False, "layers": [], "left_whole": skipped, "notes": notes, "sparsity": 0.0}, {}

    masks: dict[str, torch.Tensor] = {}
    # Memory: thresholds are found by counting, tensor by tensor, and each mask is applied as soon
    # as it is made; the masks are kept (one byte per weight) only when fine-tuning re-applies them.
    with torch.no_grad():
        if options.scope == "global":
            groups = [list(targets.items())]
        else:
            groups = [[item] for item in targets.items()]
        for group in groups:
            count = round(amount * sum(parameter.numel() for _, parameter in group))
            for name, keep in _keep_masks(group, count):
                targets[name].mul_(keep)
                if options.finetune:
                    masks[name] = keep
    layers = [
        {"parameter": name, "elements": p.numel(), "sparsity": round(int((p == 0).sum()) / p.numel(), 6)}
        for name, p in targets.items()
    ]
    total = sum(layer["elements"] for layer in layers)
    zeros = sum(int((p == 0).sum()) for p in targets.values())
    return {
        "structured": False,
        "scope": options.scope,
        "layers": layers,
        "sparsity": round(zeros / total, 6),
        "left_whole": skipped,
        "notes": notes,
    }, masks


def apply_masks(model: torch.jit.ScriptModule, masks: dict[str, torch.Tensor]) -> None:
    """Zero again what ``prune_weights`` zeroed (after a fine-tuning step moved those weights)."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].mul_(mask)


def _keep_masks(named: list[tuple[str, torch.Tensor]], count: int) -> Iterator[tuple[str, torch.Tensor]]:
    """For each tensor, in order, the mask that drops the ``count`` smallest magnitudes of them all.

    Exactly ``count`` are dropped, ties at the threshold broken by position (earlier first), as a
    stable sort of all magnitudes would. Found without concatenating or sorting: the threshold is
    selected by counting (``_magnitude_threshold``), so extra memory is one tensor's worth.
    """
    threshold, ties = _magnitude_threshold([tensor for _, tensor in named], count) if count > 0 else (-1, 0)
    for name, tensor in named:
        bits = _magnitude_bits(tensor)
        drop = bits < threshold
        if ties > 0:
            equal = bits == threshold
            if equal.any():
                at_threshold = torch.nonzero(equal).flatten()[:ties]
                drop[at_threshold] = True
                ties -= int(at_threshold.numel())
        yield name, (~drop).view_as(tensor)


def _magnitude_threshold(tensors: list[torch.Tensor], count: int) -> tuple[int, int]:
    """The bit pattern of the ``count``-th smallest |w| over ``tensors``, and how many values equal to
    it are among the ``count`` smallest.

    A two-pass radix select on the int32 bit patterns of |w| (for non-negative floats the integer
    order is the value order): count the high 16 bits, pick the bucket that holds the count-th
    value, then count the low 16 bits inside it.
    """
    high_counts = sum(torch.bincount(_magnitude_bits(t) >> 16, minlength=1 << 15) for t in tensors)
    cumulative = high_counts.cumsum(0)
    high = int(torch.searchsorted(cumulative, count))
    below = int(cumulative[high - 1]) if high else 0
    low_counts = torch.zeros(1 << 16, dtype=torch.long)
    for tensor in tensors:
        bits = _magnitude_bits(tensor)
        low_counts += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
    cumulative = low_counts.cumsum(0)
    low = int(torch.searchsorted(cumulative, count - below))
    below += int(cumulative[low - 1]) if low else 0
    return (high << 16) | low, count - below


def _magnitude_bits(tensor: torch.Tensor) -> torch.Tensor:
    """|w| as int32 bit patterns of float32, flat (a NaN sorts above every number and is never dropped)."""
    return tensor.detach().float().abs().flatten().view(torch.int32)
