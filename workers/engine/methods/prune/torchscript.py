"""Pruning of a TorchScript model: individual weights (unstructured) or whole channels (structured).

Unstructured pruning zeroes the smallest-magnitude weights; the file stays dense (same bytes)
but compresses well, and sparse kernels can use it. Structured pruning removes channels for
real, so the model gets smaller and faster: every tensor in a coupled group
(``channels.py``) is sliced by the same kept indices, in place on the ScriptModule.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch

from workers.engine.formats.torchscript import clone_model
from workers.engine.analysis.channels import ChannelGroup, Member, channel_groups, layer_name, layer_norm_nodes
from workers.engine.errors import InvalidInput, NothingToPrune, summarize_torch_error
from workers.engine.inputs import Dataset
from workers.engine.measure import count_macs, output_differences
from workers.engine.analysis.torchscript_graph import (derive_conv_groups, derive_layer_norm_shapes, matching_pattern, module_types,
                          quiet_torchscript_warnings, with_masked_layer_norms)
from workers.engine.methods.training import finetune

Progress = Callable[[str, float], None]
PRUNABLE_TYPES = ("Conv2d", "Linear", "Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")


def prune(
    model: torch.jit.ScriptModule,
    spec: Mapping[str, Any],
    data: Dataset,
    progress: Progress | None = None,
    fixed_batch: int | None = None,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Prune ``model`` in place as ``spec`` says; return it and what was done.

    ``fixed_batch``: the model accepts only batches of that many rows (a program exported without
    a dynamic batch); the analysis and the proof of each slicing then run at that size alone.

    Importance of a weight is ``|w|``; of a channel, the L1 (or L2) norm of its slices in the
    group's producing weights, each normalised by that tensor's mean slice norm.
    """
    progress = progress or (lambda stage, fraction: None)
    teacher = clone_model(model) if spec.get("finetune") else None
    selected = set(spec.get("modules", PRUNABLE_TYPES))
    exclude, excluded_by_default = _exclusions(model, spec.get("exclude"))
    types = module_types(model)
    batch = data.head(8)
    macs_before = _counted_macs(model, batch)

    progress("ranking", 0.05)
    if spec.get("structured", False):
        model, details = _prune_channels(model, spec, selected, exclude, types, data, progress, fixed_batch)
        after_step = None
    else:
        details, masks = _prune_weights(model, spec, selected, exclude, types)
        after_step = (lambda: _apply_masks(model, masks)) if masks else None

    if spec.get("finetune"):
        if data.synthetic:
            raise InvalidInput("fine-tuning needs a data file; random inputs teach the model nothing")
        options = spec["finetune"]
        details["finetune"] = finetune(
            model, data, teacher, epochs=options["epochs"], lr=options["lr"], batch_size=options["batch_size"],
            seed=options.get("seed", 0), after_step=after_step,
            progress=lambda stage, fraction: progress(stage, 0.5 + 0.45 * fraction),
        )
    macs_after = _counted_macs(model, batch)
    if isinstance(macs_before, int) and isinstance(macs_after, int):
        details["macs"] = {"before": macs_before, "after": macs_after, "batch_shape": list(batch[0].shape),
                           "counted": "convolutions and matrix multiplies (torch.utils.flop_counter, FLOPs / 2)"}
    else:
        details["notes"].append(f"multiply-accumulates not counted: {macs_before if isinstance(macs_before, str) else macs_after}")
    if excluded_by_default:
        details["notes"].append(f"the final classifier {excluded_by_default!r} is excluded by default (set 'exclude' to change)")
    if spec.get("structured") is False and spec.get("criterion") == "l2":
        details["notes"].append("for single weights l1 and l2 rank alike (|w| vs w^2)")
    progress("pruned", 0.95)
    return model, details


def _counted_macs(model: torch.jit.ScriptModule, batch: tuple[torch.Tensor, ...]) -> int | str:
    """The MACs of one batch, or why they could not be counted (the flop counter's dispatch mode
    refuses some traced graphs, e.g. a scalar recorded as a 0-dim double constant): a report
    figure, never a reason to fail the job."""
    try:
        return count_macs(model, batch)
    except Exception as error:
        return summarize_torch_error(error)


# ---------------------------------------------------------------------------- unstructured


def _prune_weights(model, spec, selected, exclude, types) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    amount = float(spec["amount"])
    targets, skipped = {}, []
    for name, parameter in model.named_parameters():
        module = name.rpartition(".")[0]
        module_type = types.get(module, "")
        if not name.endswith("weight") or parameter.dim() < 2:
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
        if spec.get("scope", "global") == "global":
            groups = [list(targets.items())]
        else:
            groups = [[item] for item in targets.items()]
        for group in groups:
            count = round(amount * sum(parameter.numel() for _, parameter in group))
            for name, keep in _keep_masks(group, count):
                targets[name].mul_(keep)
                if spec.get("finetune"):
                    masks[name] = keep
    layers = [
        {"parameter": name, "elements": p.numel(), "sparsity": round(int((p == 0).sum()) / p.numel(), 6)}
        for name, p in targets.items()
    ]
    total = sum(layer["elements"] for layer in layers)
    zeros = sum(int((p == 0).sum()) for p in targets.values())
    return {"structured": False, "scope": spec.get("scope", "global"), "layers": layers,
            "sparsity": round(zeros / total, 6), "left_whole": skipped, "notes": notes}, masks


def _apply_masks(model: torch.jit.ScriptModule, masks: dict[str, torch.Tensor]) -> None:
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


# ---------------------------------------------------------------------------- structured

# A pruned model must match the original with the same channels zeroed to this relative tolerance
# (of the largest output magnitude): float sums in another order differ by about 1e-6.
MASKED_TOLERANCE = 1e-4


def _prune_channels(model, spec, selected, exclude, types, data: Dataset, progress: Progress,
                    fixed_batch: int | None = None) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    amount = float(spec["amount"])
    criterion = spec.get("criterion", "l1")
    originals = {name: t.detach().clone() for name, t in _tensors(model).items()}
    groups = channel_groups(model, {name: t.shape for name, t in originals.items()}, data.exactly(fixed_batch or 2))
    candidates: list[tuple[ChannelGroup, torch.Tensor]] = []
    left_whole = []
    for group in groups:
        reasons = list(group.blocked)
        for layer, kind in sorted({(layer_name(m.parameter), m.kind) for m in group.producers}):
            if kind not in selected:
                reasons.append(f"{layer} is a {kind}, not a selected type")
            elif (pattern := matching_pattern(layer, exclude)) is not None:
                reasons.append(f"{layer} is excluded by pattern {pattern!r}")
        units = group.size // group.unit
        keep_units = max(1, int(round(units * (1.0 - amount))))
        if not reasons and keep_units >= units:
            what = f"{units} groups of {group.unit} channels" if group.unit > 1 else f"{group.size} channels"
            reasons.append(f"{what} are too few to prune at amount {amount}")
        if reasons:
            left_whole.append({"group": group.name, "channels": group.size, "reason": "; ".join(reasons)})
            continue
        scores = _channel_importance(group, originals, criterion).view(units, group.unit).sum(1)
        kept_units = torch.topk(scores, keep_units).indices.sort().values
        keep = (kept_units[:, None] * group.unit + torch.arange(group.unit)).flatten()
        candidates.append((group, keep))

    # Sizes compiled into graphs become expressions of the input (exact before and after slicing).
    rewritten = False
    if any(_reads_grouped_conv(group, originals) for group, _ in candidates):
        rewritten |= derive_conv_groups(model)
    if any(group.norms for group, _ in candidates):
        rewritten |= derive_layer_norm_shapes(model)
    if rewritten:
        model = clone_model(model)  # reloaded: the rewritten graphs take effect
    checks = check_batches(data, fixed_batch)
    accepted: list[tuple[ChannelGroup, torch.Tensor]] = []
    if candidates:
        progress("checking groups", 0.1)
        if _mismatch(model, originals, candidates, checks) is None:
            accepted = list(candidates)
        else:  # find the groups that break the model, one at a time
            for index, candidate in enumerate(candidates):
                problem = _mismatch(model, originals, accepted + [candidate], checks)
                if problem is None:
                    accepted.append(candidate)
                else:
                    left_whole.append({"group": candidate[0].name, "channels": candidate[0].size,
                                       "reason": f"put back: {problem}"})
                progress("checking groups", 0.1 + 0.3 * (index + 1) / len(candidates))
    _materialize(model, originals, accepted)
    # Weights no group indexes (an LSTM's, an op the analysis does not model): name their layers.
    covered = {m.parameter for group in groups for m in group.members}
    unmodelled = sorted({f"{layer_name(name)} ({types.get(layer_name(name)) or 'functional'})"
                         for name, tensor in originals.items() if tensor.dim() >= 2 and name not in covered})
    if not accepted:
        reasons = "; ".join(f"{entry['group']}: {entry['reason']}" for entry in left_whole[:12])
        more = f" (and {len(left_whole) - 12} more groups)" if len(left_whole) > 12 else ""
        layers = f" Layers the channel analysis does not model: {', '.join(unmodelled[:12])}." if unmodelled else ""
        raise NothingToPrune(f"structured pruning can remove no channel group of this model, so nothing would "
                             f"change. Reasons per group: {reasons or 'no conv or linear layer makes channels'}{more}."
                             f"{layers}"[:4000])

    pruned = [{"group": g.name, "channels_before": g.size, "channels_after": int(keep.numel()),
               "tensors": sorted({m.parameter for m in g.members}),
               **({"layer_norms_renormalised": len(g.norms)} if g.norms else {})} for g, keep in accepted]
    notes = []
    if renormalised := [g.name for g, _ in accepted if g.norms]:
        notes.append(f"pruned groups normalised by a layer_norm: {len(renormalised)} ({', '.join(renormalised[:6])}"
                     f"{', ...' if len(renormalised) > 6 else ''}); those norms' mean and variance now cover the kept "
                     "channels only, so outputs move further from the original than zeroing alone would (see "
                     "fidelity); fine-tuning recovers it")
    return model, {
        "structured": True, "criterion": criterion, "groups": pruned, "left_whole": left_whole,
        "channels": {"before": sum(g.size for g, _ in accepted) + sum(e["channels"] for e in left_whole),
                     "after": sum(int(k.numel()) for _, k in accepted) + sum(e["channels"] for e in left_whole)},
        "verified": "each pruned group matches the original with the same channels zeroed (and layer_norm "
                    "statistics over the kept channels), on the example inputs",
        "layers_not_modelled": unmodelled,
        "notes": notes,
    }


def _reads_grouped_conv(group: ChannelGroup, tensors: dict[str, torch.Tensor]) -> bool:
    """A conv weight sliced along its output rows without producing the channels: a grouped conv's rows."""
    return any(not m.producer and m.dim == 0 and tensors[m.parameter].dim() >= 3 for m in group.members)


def _channel_importance(group: ChannelGroup, tensors: dict[str, torch.Tensor], criterion: str) -> torch.Tensor:
    score = torch.zeros(group.size)
    for member in group.producers:
        tensor = tensors[member.parameter]
        if tensor.dim() < 2:
            continue
        rows = tensor.detach().float().narrow(member.dim, member.offset, member.length).transpose(0, member.dim)
        rows = rows.reshape(group.size, -1)
        norms = rows.abs().sum(1) if criterion == "l1" else rows.pow(2).sum(1).sqrt()
        score += norms / norms.mean().clamp(min=1e-12)
    return score


def _entries(member: Member, channels: torch.Tensor) -> torch.Tensor:
    """Indices along ``member.dim`` of the given channels (each owns ``scale`` consecutive entries)."""
    return member.offset + (channels[:, None] * member.scale + torch.arange(member.scale)).flatten()


def _dropped(chosen: list[tuple[ChannelGroup, torch.Tensor]],
             originals: dict[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
    """(tensor, dim) -> boolean mask of the entries kept along dim."""
    keep_masks: dict[tuple[str, int], torch.Tensor] = {}
    for group, keep in chosen:
        dropped = torch.ones(group.size, dtype=torch.bool)
        dropped[keep] = False
        channels = torch.nonzero(dropped).flatten()
        for member in group.members:
            key = (member.parameter, member.dim)
            size = originals[member.parameter].shape[member.dim]
            keep_masks.setdefault(key, torch.ones(size, dtype=torch.bool))[_entries(member, channels)] = False
    return keep_masks


def _slice(tensor: torch.Tensor, dim: int, kept: torch.Tensor) -> torch.Tensor:
    """The kept entries of ``tensor`` along ``dim`` (the one place a pruned tensor is cut)."""
    return tensor.index_select(dim, kept)


def _materialize(model: torch.jit.ScriptModule, originals: dict[str, torch.Tensor],
                 chosen: list[tuple[ChannelGroup, torch.Tensor]], masked: bool = False) -> None:
    """Set every tensor to its original sliced by the kept channels of the chosen groups.

    ``masked``: keep the shapes and zero the dropped entries instead: the reference a slicing must match.
    """
    changed: dict[str, torch.Tensor] = {}
    for (name, dim), mask in sorted(_dropped(chosen, originals).items()):
        base = changed.get(name, originals[name])
        if masked:
            changed[name] = base.index_fill(dim, torch.nonzero(~mask).flatten(), 0)
        else:
            changed[name] = _slice(base, dim, torch.nonzero(mask).flatten())
    current = _tensors(model)
    for name, original in originals.items():
        value = changed.get(name, original)
        if current[name].shape != value.shape or not torch.equal(current[name], value):
            set_tensor(model, name, value.clone())


def _mismatch(model: torch.jit.ScriptModule, originals: dict[str, torch.Tensor],
              chosen: list[tuple[ChannelGroup, torch.Tensor]], batches: list[tuple[torch.Tensor, ...]]) -> str | None:
    """Why slicing ``chosen`` is wrong, or None: the sliced model must run and match the masked reference.

    The reference is the model with the dropped entries zeroed; where a chosen group passes
    through a layer_norm, that norm's statistics cover the kept channels only (zeroing alone
    would still count the dropped ones), so the reference is exact and a wrong slice still shows.
    """
    _materialize(model, originals, chosen, masked=True)
    reference_model: Callable[..., Any] = model
    if norms := _kept_norm_entries(chosen):
        try:
            with quiet_torchscript_warnings():
                reference_model = with_masked_layer_norms(model, norms, layer_norm_nodes)
        except Exception as error:  # a graph this rewrite cannot run: the group cannot be proven, so it stays
            return f"no exact reference for its layer_norm statistics: {summarize_torch_error(error)}"
    reference = [_run(reference_model, batch) for batch in batches]
    _materialize(model, originals, chosen)
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
                return (f"the pruned model does not match the original with the same channels zeroed "
                        f"(max difference {error:.3g} on outputs up to {scale:.3g})")
    return None


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


def set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor, requires_grad: bool = False) -> None:
    """Set the tensor at the dotted path ``name`` (of a ScriptModule or a module) to ``value``; a
    parameter stays a parameter, with ``requires_grad``."""
    path, _, attribute = name.rpartition(".")
    module = model
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    if attribute in dict(module.named_parameters(recurse=False)):
        value = torch.nn.Parameter(value, requires_grad=requires_grad)
    setattr(module, attribute, value)


def _tensors(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def check_batches(data: Dataset, fixed_batch: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """A batch of one and a batch of eight: pruning must not break other batch sizes (a model that
    takes only ``fixed_batch`` rows is checked at that size)."""
    return [data.exactly(fixed_batch)] if fixed_batch else [data.exactly(1), data.exactly(8)]


# ---------------------------------------------------------------------------- exclusions


def _exclusions(model: torch.jit.ScriptModule, exclude: list[str] | None) -> tuple[list[str], str | None]:
    """The user's patterns, or by default the final classifier: the last Linear that makes the output."""
    if exclude is not None:
        return list(exclude), None
    classifier = _final_classifier(model)
    return ([classifier] if classifier else []), classifier


def _final_classifier(model: torch.jit.ScriptModule) -> str | None:
    with quiet_torchscript_warnings():
        graph = model.inlined_graph
    linears = [node for node in graph.nodes() if node.kind() == "aten::linear"]
    if not linears:
        return None
    outputs = set(graph.outputs())
    last = linears[-1]
    if last.output() not in outputs:
        return None
    weight = last.inputsAt(1).node()
    names = []
    while weight.kind() == "prim::GetAttr":
        names.append(weight.s("name"))
        weight = weight.inputsAt(0).node()
    return ".".join(reversed(names[1:])) or None
