"""The proof of a slicing: the sliced model must run and match the masked reference (the original
with the same channels zeroed, layer_norm statistics over the kept channels) on every check batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from workers.engine.analysis.channels import ChannelGroup, layer_norm_nodes
from workers.engine.analysis.slicing import materialize
from workers.engine.errors import summarize_torch_error
from workers.engine.inputs import Dataset
from workers.engine.measure import output_differences
from workers.engine.torchscript_graph import quiet_torchscript_warnings, with_masked_layer_norms

# A pruned model must match the original with the same channels zeroed to this relative tolerance
# (of the largest output magnitude): float sums in another order differ by about 1e-6.
MASKED_TOLERANCE = 1e-4


def mismatch(
    model: torch.jit.ScriptModule,
    originals: dict[str, torch.Tensor],
    chosen: list[tuple[ChannelGroup, torch.Tensor]],
    batches: list[tuple[torch.Tensor, ...]],
) -> str | None:
    """Why slicing ``chosen`` is wrong, or None: the sliced model must run and match the masked reference.

    The reference is the model with the dropped entries zeroed; where a chosen group passes
    through a layer_norm, that norm's statistics cover the kept channels only (zeroing alone
    would still count the dropped ones), so the reference is exact and a wrong slice still shows.
    """
    materialize(model, originals, chosen, masked=True)
    reference_model: Callable[..., Any] = model
    if norms := _kept_norm_entries(chosen):
        try:
            with quiet_torchscript_warnings():
                reference_model = with_masked_layer_norms(model, norms, layer_norm_nodes)
        except Exception as error:  # a graph this rewrite cannot run: the group cannot be proven, so it stays
            return f"no exact reference for its layer_norm statistics: {summarize_torch_error(error)}"
    reference = [_run(reference_model, batch) for batch in batches]
    materialize(model, originals, chosen)
    for batch, expected in zip(batches, reference):
        got = _run(model, batch)
        if isinstance(got, str):
            return f"the model failed after slicing it: {got}"
        if isinstance(expected, str):
            return f"the masked reference failed: {expected}"
        pairs = output_differences(expected, got)
        if pairs is None:
            return "slicing changed the shape of the model's outputs"
        for a, b, error, scale in pairs:
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    return "slicing changed an integer output of the model"
                continue
            if not error <= MASKED_TOLERANCE * max(scale, 1.0):
                return (
                    f"the pruned model does not match the original with the same channels zeroed "
                    f"(max difference {error:.3g} on outputs up to {scale:.3g})"
                )
    return None


def same_outputs(model: Callable[..., Any], other: Callable[..., Any], batches: list[tuple[torch.Tensor, ...]]) -> bool:
    """Whether ``other`` computes exactly what ``model`` does on every batch (a graph rewrite that must change nothing)."""
    for batch in batches:
        expected, got = _run(model, batch), _run(other, batch)
        if isinstance(expected, str) or isinstance(got, str):
            return False
        pairs = output_differences(expected, got)
        if pairs is None or any(error != 0.0 for _, _, error, _ in pairs):
            return False
    return True


def _kept_norm_entries(chosen: list[tuple[ChannelGroup, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """For each layer_norm of the chosen groups, a 0/1 mask of its last dimension: 1 where a channel is kept."""
    masks = {}
    for group, keep in chosen:
        kept = torch.zeros(group.size)
        kept[keep] = 1.0
        for norm in group.norms:
            masks[norm.index] = kept.repeat_interleave(norm.scale)
    return masks


def _run(model: Callable[..., Any], batch: tuple[torch.Tensor, ...]) -> Any:
    try:
        with torch.no_grad(), quiet_torchscript_warnings():
            return model(*batch)
    except Exception as error:  # any failure of a sliced model is a reason to put the group back
        return summarize_torch_error(error)


def check_batches(data: Dataset, fixed_batch: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """A batch of one and a batch of eight: pruning must not break other batch sizes (a model that
    takes only ``fixed_batch`` rows is checked at that size)."""
    return [data.exactly(fixed_batch)] if fixed_batch else [data.exactly(1), data.exactly(8)]
