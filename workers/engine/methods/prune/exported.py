"""Pruning a torch.export program (``.pt2``): magnitude pruning in its state dict, or channel pruning
on a trace of its module with the sliced tensors copied back and the program re-exported."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.export import ExportedProgram

from modelpress.formats import EXPORTED
from modelpress.options import PruneOptions
from workers.engine.analysis.program_graph import attribute, is_attribute
from workers.engine.analysis.proof import MASKED_TOLERANCE, check_batches
from workers.engine.analysis.slicing import set_tensor
from workers.engine.errors import UnsupportedModel, summarize_torch_error
from workers.engine.formats.exported import LAYER_OPS, fixed_batch, reexport
from workers.engine.inputs import Dataset
from workers.engine.measure import count_macs, output_differences
from workers.engine.methods.prune.torchscript import prune
from workers.engine.methods.quantize.exported_forms import product_weight
from workers.engine.torchscript_graph import matching_pattern, quiet_torchscript_warnings

Progress = Callable[[str, float], None]


def prune_program(
    program: ExportedProgram, options: PruneOptions, data: Dataset, progress: Progress
) -> tuple[ExportedProgram, dict[str, Any]]:
    """Zero the smallest-magnitude weights of Linear / Conv2d ops in the program's state dict.

    |w| below the ``amount`` quantile (of all chosen weights with scope ``global``, of each layer's
    with ``per_layer``) becomes 0. The graph is unchanged; zeros shrink the file once compressed.
    """
    if options.regularize:
        raise UnsupportedModel(
            f"importance {options.importance} is not available for .pt2 programs: a program "
            "is trained through a trace of its eval-mode graph, where BatchNorm keeps fixed running "
            "statistics, and the sparsity-training phase is not supported there; upload the model "
            "as TorchScript, or use importance l1 or l2"
        )
    if options.structured:
        return prune_channels(program, options, data, progress)
    if options.finetune:
        raise UnsupportedModel(
            "fine-tuning after unstructured pruning is not available for .pt2 programs yet; drop "
            "'finetune' (and 'schedule', which fine-tunes between its steps), or upload the model "
            "as TorchScript"
        )
    amount = options.amount
    modules, exclude = set(options.modules), list(options.exclude or [])
    layer_weights: list[str] = []  # in graph order
    for node in program.graph.nodes:
        kind = LAYER_OPS.get(node.target) if node.op == "call_function" else None
        weight = node.args[1] if kind is not None else product_weight(node)  # GPT-2's Conv1D: addmm(b, x, W)
        kind = kind or ("Linear" if weight is not None else None)
        if kind is None or kind not in modules or not isinstance(weight, torch.fx.Node):
            continue
        name = program.graph_signature.inputs_to_parameters.get(weight.name)
        if name is not None and program.state_dict[name].dim() >= 2 and name not in layer_weights:
            layer_weights.append(name)
    notes = ["zeros are stored as such: the file shrinks once compressed (see deflate_bytes)"]
    if options.exclude is None and layer_weights:
        # As for TorchScript: the final classifier stays whole by default. A language model's output layer
        # often shares its weight with the input embedding, which pruning it would zero as well.
        final = layer_weights.pop()
        notes.append(f"the final layer {final.rpartition('.')[0]!r} is excluded by default (set 'exclude' to change)")
    weights = {
        name: program.state_dict[name]
        for name in layer_weights
        if not matching_pattern(name.rpartition(".")[0], exclude)
    }
    if not weights:
        raise UnsupportedModel(f"the program has no {' or '.join(sorted(modules))} weight to prune")
    if options.scope == "global":
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
    return program, {
        "format": EXPORTED,
        "structured": False,
        "sparsity": round(zeros / total, 5),
        "layers": layers,
        "notes": notes,
    }


def prune_channels(
    program: ExportedProgram, options: PruneOptions, data: Dataset, progress: Progress
) -> tuple[ExportedProgram, dict[str, Any]]:
    """Structured pruning of a program: the TorchScript path's channel analysis on a trace of the
    unlifted module, then the sliced (and fine-tuned) tensors copied back by name and re-exported.

    The trace keeps every tensor under its name in ``ExportedProgram.module()`` and sees the same
    aten calls, so each slicing is proven there against the masked reference (``methods.prune.torchscript.prune``);
    the re-exported program is then checked against the proven trace on the same rows."""
    fixed = fixed_batch(program)
    if fixed and options.finetune:
        raise UnsupportedModel(
            f"the program was exported for batches of exactly {fixed} rows, and fine-tuning "
            "trains in batches of other sizes: export it with a dynamic batch "
            "(dynamic_shapes), or drop 'finetune' (and 'schedule')"
        )
    module = program.module()
    _sizes_as_methods(module)
    example = data.exactly(fixed or 2)
    try:
        with quiet_torchscript_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the guards become constants
            traced = torch.jit.trace(module, example, check_trace=False, strict=False)
    except Exception as error:
        raise UnsupportedModel(
            f"structured pruning analyses a trace of the program, and tracing it failed: {summarize_torch_error(error)}"
        ) from None
    traced, details = prune(traced, options, data, progress, fixed_batch=fixed)
    shapes_before = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    with torch.no_grad():
        copies: dict[tuple[Any, ...], torch.Tensor] = {}  # tied tensors (GPT-2's lm_head) stay one tensor
        for name, tensor in traced.state_dict().items():
            before = attribute(module, name)
            copy = tensor.detach().clone()
            if before.numel():  # (every empty tensor has data_ptr 0)
                tie = (before.data_ptr(), tuple(before.shape), before.stride(), before.dtype)
                first = copies.setdefault(tie, copy)
                if first is not copy and (first.shape != tensor.shape or not torch.equal(first, tensor.detach())):
                    raise UnsupportedModel(
                        f"{name} shares its tensor with another name, and the pruned trace changed them "
                        "differently; upload the model as TorchScript to prune its channels"
                    )
                copy = first
            set_tensor(module, name, copy, requires_grad=before.requires_grad)
    _follow_sliced_sizes(module, shapes_before)
    exported = reexport(module, program, example)
    for rows in check_batches(data, fixed):
        with torch.no_grad(), quiet_torchscript_warnings():
            pairs = output_differences(traced(*rows), exported.module()(*rows))
        scale = max((largest for expected, _, _, largest in pairs or [] if expected.numel()), default=0.0) or 1.0
        if pairs is None or any(error > MASKED_TOLERANCE * scale for _, _, error, _ in pairs):
            raise UnsupportedModel(
                "the pruned program, exported again, does not compute what the pruned trace "
                "computes (a size the trace could not follow is fixed in the graph); upload "
                "the model as TorchScript to prune its channels"
            )
    if "macs" not in details:  # counted on the programs themselves when the trace refused the counter
        batch = data.exactly(fixed or 8)
        details["macs"] = {
            "before": count_macs(program.module(), batch),
            "after": count_macs(exported.module(), batch),
            "batch_shape": list(batch[0].shape),
            "counted": "convolutions and matrix multiplies (torch.utils.flop_counter, FLOPs / 2)",
        }
        details["notes"] = [
            note for note in details["notes"] if not note.startswith("multiply-accumulates not counted")
        ]
    details["format"] = EXPORTED
    details["route"] = (
        "channel analysis on a torch.jit.trace of ExportedProgram.module(), tensors copied back, re-exported"
    )
    return exported, details


# Where a size that must follow sliced weights sits in an op's arguments.
_CONV_GROUPS = {
    torch.ops.aten.conv1d.default: 6,
    torch.ops.aten.conv2d.default: 6,
    torch.ops.aten.conv3d.default: 6,
    torch.ops.aten.convolution.default: 8,
}


_LAYER_NORM = torch.ops.aten.layer_norm.default


def _sizes_as_methods(module: torch.fx.GraphModule) -> None:
    """``aten.sym_size.int(x, d)`` becomes ``x.size(d)``, ``aten.view(x, shape)`` ``x.view(shape)``
    (and reshape, expand): the same values, but the tracer records the methods with the sizes they
    read, and the op calls with the numbers they got, which would fix the batch size of every
    ``view(x, [batch, ...])`` in the trace (a channel shuffle, a flatten written with ``x.size(0)``)
    and fail each slicing's check at other batch sizes.

    Sizes of channels that the program holds as numbers (every static size is a number in a program)
    follow the tensors: a view's or reshape's last size equal to its input's last dimension becomes
    ``x.size(-1)`` (``transformers``' Conv1D: ``[-1, nf]`` and ``[batch, tokens, nf]``), and a split
    into equal pieces of a literal size becomes ``x.chunk(pieces, dim)`` (GPT-2's fused q/k/v).
    Both compute the same as before; once channels are sliced they compute the sliced sizes."""
    changed = _channel_sizes_follow_inputs(module)
    for node in module.graph.nodes:
        method = _AS_METHOD.get(node.target) if node.op == "call_function" else None
        if method is not None and not node.kwargs:
            node.op, node.target = "call_method", method
            changed = True
        elif node.op == "call_function" and node.target in _ARANGE:
            # The op overload wants numbers where the tracer holds sizes as tensors (transformers' position
            # ids: arange(seq_len)); torch.arange takes either and is recorded with the size it read.
            node.target = torch.arange
            changed = True
    if changed:
        module.recompile()


def _channel_sizes_follow_inputs(module: torch.fx.GraphModule) -> bool:
    """The rewrites ``_sizes_as_methods`` describes, read from each node's recorded value (``meta['val']``)."""
    changed = False
    for node in list(module.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        before = node.args[0].meta.get("val")
        shape = tuple(before.shape) if isinstance(before, torch.Tensor) else None
        if not shape:
            continue
        # Only sizes fixed at export (plain ints): a symbolic one matched the example by chance, and
        # ``chunk`` of a dynamic dimension cuts it otherwise than ``split`` (found by a review).
        static = [size if type(size) is int else None for size in shape]
        if node.target in _RESHAPES and len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            sizes = list(node.args[1])
            if sizes and isinstance(sizes[-1], int) and sizes[-1] > 1 and sizes[-1] == static[-1]:
                with module.graph.inserting_before(node):
                    last = module.graph.call_method("size", (node.args[0], -1))
                node.update_arg(1, [*sizes[:-1], last])
                changed = True
        elif node.target == torch.ops.aten.split.Tensor and len(node.args) >= 2 and isinstance(node.args[1], int):
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            pieces = node.meta.get("val")
            if (
                isinstance(dim, int)
                and isinstance(pieces, (list, tuple))
                and len(pieces) > 1
                and node.args[1] * len(pieces) == static[dim]
            ):
                node.op, node.target = "call_method", "chunk"
                node.args, node.kwargs = (node.args[0], len(pieces), dim), {}
                changed = True
    return changed


_RESHAPES = {torch.ops.aten.view.default, torch.ops.aten.reshape.default}
# Ops that take or give sizes, called as the tensor methods the tracer follows (an op overload
# called from Python gets the traced size as a plain number).
_ARANGE = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}
_AS_METHOD = {
    torch.ops.aten.sym_size.int: "size",
    torch.ops.aten.view.default: "view",
    torch.ops.aten.reshape.default: "reshape",
    torch.ops.aten.expand.default: "expand",
}


def _follow_sliced_sizes(module: torch.fx.GraphModule, shapes_before: dict[str, tuple[int, ...]]) -> None:
    """Rewrite the sizes the graph holds as numbers to fit the sliced weights, as the TorchScript path
    does with expressions (``derive_conv_groups``, ``derive_layer_norm_shapes``): a grouped conv
    whose whole groups were removed gets ``groups * new rows // old rows`` (its weight's first axis
    is groups x per-group channels, transposed or not); a ``layer_norm`` over sliced channels gets
    its weight's new shape as ``normalized_shape``."""
    changed = False
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        position = _CONV_GROUPS.get(node.target)
        if (
            position is not None
            and len(node.args) > position
            and isinstance(node.args[position], int)
            and node.args[position] > 1
            and is_attribute(node.args[1])
        ):
            old_rows, new_rows = shapes_before[node.args[1].target][0], attribute(module, node.args[1].target).shape[0]
            if new_rows != old_rows:
                groups = node.args[position]
                node.update_arg(position, groups * new_rows // old_rows)
                changed = True
        elif node.target == _LAYER_NORM and len(node.args) > 2 and is_attribute(node.args[2]):
            shape = list(attribute(module, node.args[2].target).shape)
            if list(node.args[1]) != shape:
                node.update_arg(1, shape)
                changed = True
    if changed:
        module.recompile()


def _magnitude_quantile(magnitudes: torch.Tensor, amount: float) -> float:
    """The magnitude below which ``amount`` of the values lie (kthvalue: exact, no sort of a copy)."""
    k = int(round(amount * magnitudes.numel()))
    if k <= 0:
        return -1.0
    return float(magnitudes.kthvalue(k).values)
