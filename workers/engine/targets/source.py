"""The request's model in the forms the exporters take: something to call, a ``torch.export`` program,
and the calibration batches cut to the rows a fixed-batch artifact accepts. Imports torch."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from modelpress.formats import EXPORTED
from workers.engine.errors import TargetFailed, summarize_torch_error
from workers.engine.targets.common import TargetRequest
from workers.engine.torchscript_graph import quiet_torchscript_warnings


def runnable(request: TargetRequest) -> Any:
    """What runs the request's model on positional tensors: the ScriptModule, or the program's module."""
    return request.model.module() if request.format_name == EXPORTED else request.model


def fixed_rows(request: TargetRequest) -> int | None:
    """The batch size a ``.pt2`` program was exported for; None for TorchScript (any batch) and for
    programs with a dynamic batch."""
    if request.format_name != EXPORTED:
        return None
    from workers.engine.formats.exported import fixed_batch

    return fixed_batch(request.model)


def exported_program(request: TargetRequest, target: str) -> torch.export.ExportedProgram:
    """The model as a ``torch.export`` program for exactly the example's shapes (ExecuTorch plans
    its memory for fixed shapes).

    A ``.pt2`` program is re-exported from its module; a TorchScript model goes through torch's
    TorchScript-to-export converter (``torch._export.converter.TS2EPConverter``), which reads the
    TorchScript graph op by op: models whose TorchScript uses control flow on values or ops the
    converter has no rule for fail here, with its reason."""
    try:
        with torch.no_grad(), quiet_torchscript_warnings():
            if request.format_name == EXPORTED:
                return torch.export.export(request.model.module(), tuple(request.example))
            from torch._export.converter import TS2EPConverter

            # The converter warns about every BatchNorm's unused num_batches_tracked, and about
            # TorchScript's constant conditions, which it specialises as torch.export would.
            warnings.filterwarnings("ignore", message=r".*(num_batches_tracked|Pred is a Python constant).*")
            converted = TS2EPConverter(request.model, tuple(request.example)).convert()
            # Once more through torch.export: the converter's program keeps TorchScript's
            # signature quirks (constants lifted as inputs); a plain export of its module does not.
            module = converted.module()
            _parameters_again(module, {name for name, _ in request.model.named_parameters()})
            return torch.export.export(module, tuple(request.example))
    except TargetFailed:
        raise
    except Exception as error:
        route = "torch.export" if request.format_name == EXPORTED else "the TorchScript-to-torch.export converter"
        raise TargetFailed(target, f"{route} could not export the model: {summarize_torch_error(error)}") from None


def _parameters_again(module: torch.nn.Module, names: set[str]) -> None:
    """Make the TorchScript model's parameters parameters again: the converter lifts the weights of a
    loaded TorchScript file as buffers, and PT2E's conv-BatchNorm folding then fails registering the
    folded weight ("attribute 'weight' already exists")."""
    for name, buffer in list(module.named_buffers()):
        if name in names:
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            del holder._buffers[leaf]
            holder.register_parameter(leaf, torch.nn.Parameter(buffer, requires_grad=False))


def torch_batches(batches: list[tuple[torch.Tensor, ...]], rows: int | None) -> list[tuple[torch.Tensor, ...]]:
    """The batches as they are (``rows`` None), or their rows regrouped into batches of exactly
    ``rows`` (the last one filled up with the first rows again) for an artifact of a fixed batch."""
    batches = [tuple(t.detach().cpu() for t in batch) for batch in batches]
    if rows is None or all(int(batch[0].shape[0]) == rows for batch in batches):
        return batches
    joined = [torch.cat(column) for column in zip(*batches)]
    total = int(joined[0].shape[0])
    if total < rows:
        repeats = -(-rows // total)
        joined = [t.repeat(repeats, *([1] * (t.dim() - 1))) for t in joined]
        total = int(joined[0].shape[0])
    regrouped = []
    for start in range(0, total, rows):
        chunk = [t[start : start + rows] for t in joined]
        short = rows - int(chunk[0].shape[0])
        if short:
            chunk = [torch.cat([c, t[:short]]) for c, t in zip(chunk, joined)]
        regrouped.append(tuple(chunk))
    return regrouped


def numpy_batches(batches: list[tuple[torch.Tensor, ...]], rows: int | None) -> list[tuple[Any, ...]]:
    """``torch_batches`` as numpy arrays (what onnxruntime and OpenVINO calibrate on)."""
    return [tuple(t.numpy() for t in batch) for batch in torch_batches(batches, rows)]
