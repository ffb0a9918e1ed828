"""Pruning of a TorchScript model: individual weights (unstructured) or whole channels (structured).

Unstructured pruning zeroes the smallest-magnitude weights; the file stays dense (same bytes)
but compresses well, and sparse kernels can use it. Structured pruning removes channels for
real, so the model gets smaller and faster: every tensor in a coupled group
(``channels.py``) is sliced by the same kept indices, in place on the ScriptModule.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .artifacts import clone_model
from .channels import ChannelGroup, channel_groups
from .errors import InvalidInput, UnsupportedModel
from .inputs import Dataset
from .measure import count_macs, run_model
from .torchscript import matching_pattern, module_types, quiet_torchscript_warnings
from .training import finetune

Progress = Callable[[str, float], None]
PRUNABLE_TYPES = ("Conv2d", "Linear")


def prune(
    model: torch.jit.ScriptModule,
    spec: Mapping[str, Any],
    data: Dataset,
    progress: Progress | None = None,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Prune ``model`` in place as ``spec`` says; return it and what was done.

    Importance of a weight is ``|w|``; of a channel, the L1 (or L2) norm of its slices in the
    group's producing weights, each normalised by that tensor's mean slice norm.
    """
    progress = progress or (lambda stage, fraction: None)
    teacher = clone_model(model) if spec.get("finetune") else None
    selected = set(spec.get("modules", PRUNABLE_TYPES))
    exclude, excluded_by_default = _exclusions(model, spec.get("exclude"))
    types = module_types(model)
    batch = data.head(8)
    macs_before = count_macs(model, batch)

    progress("ranking", 0.05)
    if spec.get("structured", False):
        details = _prune_channels(model, spec, selected, exclude, types, data, progress)
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
    details["macs"] = {"before": macs_before, "after": count_macs(model, batch),
                       "batch_shape": list(batch[0].shape), "counted": "convolutions and matrix multiplies (torch.utils.flop_counter, FLOPs / 2)"}
    if excluded_by_default:
        details["notes"].append(f"the final classifier {excluded_by_default!r} is excluded by default (set 'exclude' to change)")
    if spec.get("structured") is False and spec.get("criterion") == "l2":
        details["notes"].append("for single weights l1 and l2 rank alike (|w| vs w^2)")
    progress("pruned", 0.95)
    return model, details


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
    with torch.no_grad():
        if spec.get("scope", "global") == "global":
            magnitudes = torch.cat([p.detach().abs().flatten() for p in targets.values()])
            drop = _smallest(magnitudes, round(amount * magnitudes.numel()))
            keep_flat = torch.ones(magnitudes.numel(), dtype=torch.bool)
            keep_flat[drop] = False
            start = 0
            for name, parameter in targets.items():
                masks[name] = keep_flat[start:start + parameter.numel()].view_as(parameter)
                start += parameter.numel()
        else:
            for name, parameter in targets.items():
                keep = torch.ones(parameter.numel(), dtype=torch.bool)
                keep[_smallest(parameter.detach().abs().flatten(), round(amount * parameter.numel()))] = False
                masks[name] = keep.view_as(parameter)
        _apply_masks(model, masks)
    layers = [
        {"parameter": name, "elements": p.numel(), "sparsity": round(float((p == 0).float().mean()), 6)}
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


def _smallest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` smallest values (exactly ``count``, ties broken by position)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.argsort(values, stable=True)[:count]


# ---------------------------------------------------------------------------- structured


def _prune_channels(model, spec, selected, exclude, types, data: Dataset, progress: Progress) -> dict[str, Any]:
    amount = float(spec["amount"])
    criterion = spec.get("criterion", "l1")
    originals = {name: t.detach().clone() for name, t in _tensors(model).items()}
    groups = channel_groups(model, {name: t.shape for name, t in originals.items()})
    candidates: list[tuple[ChannelGroup, torch.Tensor]] = []
    left_whole = []
    for group in groups:
        producer_modules = sorted({m.parameter.rpartition(".")[0] for m in group.members if m.producer})
        reasons = list(group.blocked)
        for module in producer_modules:
            module_type = types.get(module, "")
            if module_type not in selected:
                reasons.append(f"{module} is a {module_type}, not a selected type")
            elif (pattern := matching_pattern(module, exclude)) is not None:
                reasons.append(f"{module} is excluded by pattern {pattern!r}")
        keep_count = max(1, int(round(group.size * (1.0 - amount))))
        if not reasons and keep_count >= group.size:
            reasons.append(f"{group.size} channels are too few to prune at amount {amount}")
        if reasons:
            left_whole.append({"group": group.name, "channels": group.size, "reason": "; ".join(reasons)})
            continue
        scores = _channel_importance(group, originals, criterion)
        keep = torch.topk(scores, keep_count).indices.sort().values
        candidates.append((group, keep))

    checks = _check_batches(data)
    accepted: list[tuple[ChannelGroup, torch.Tensor]] = []
    if candidates:
        _materialize(model, originals, candidates)
        failure = _failure(model, checks)
        if failure is None:
            accepted = candidates
        else:  # find the groups that break the model, one at a time
            for index, candidate in enumerate(candidates):
                _materialize(model, originals, accepted + [candidate])
                failure = _failure(model, checks)
                if failure is None:
                    accepted.append(candidate)
                else:
                    left_whole.append({"group": candidate[0].name, "channels": candidate[0].size,
                                       "reason": f"the model failed after slicing it: {failure}"})
                progress("checking groups", 0.1 + 0.3 * (index + 1) / len(candidates))
            _materialize(model, originals, accepted)
    if _failure(model, checks) is not None:  # never hand back a model that fails on its own inputs
        _materialize(model, originals, [])
        raise UnsupportedModel("channel pruning produced a model that does not run; no group could be pruned safely")

    pruned = [{"group": g.name, "channels_before": g.size, "channels_after": int(keep.numel()),
               "tensors": sorted({m.parameter for m in g.members})} for g, keep in accepted]
    notes = []
    if not pruned:
        notes.append("nothing prunable: every channel group had to be left whole, so the model is returned unchanged")
    return {"structured": True, "criterion": criterion, "groups": pruned, "left_whole": left_whole,
            "channels": {"before": sum(g.size for g, _ in accepted) + sum(e["channels"] for e in left_whole),
                         "after": sum(int(k.numel()) for _, k in accepted) + sum(e["channels"] for e in left_whole)},
            "notes": notes}


def _channel_importance(group: ChannelGroup, tensors: dict[str, torch.Tensor], criterion: str) -> torch.Tensor:
    score = torch.zeros(group.size)
    for member in group.members:
        tensor = tensors[member.parameter]
        if not member.producer or tensor.dim() < 2:
            continue
        rows = tensor.detach().float().narrow(member.dim, member.offset, member.length).transpose(0, member.dim)
        rows = rows.reshape(member.length, -1)
        norms = rows.abs().sum(1) if criterion == "l1" else rows.pow(2).sum(1).sqrt()
        score += norms / norms.mean().clamp(min=1e-12)
    return score


def _materialize(model: torch.jit.ScriptModule, originals: dict[str, torch.Tensor],
                 chosen: list[tuple[ChannelGroup, torch.Tensor]]) -> None:
    """Set every tensor to its original sliced by the kept channels of the chosen groups."""
    keep_masks: dict[tuple[str, int], torch.Tensor] = {}
    for group, keep in chosen:
        dropped = torch.ones(group.size, dtype=torch.bool)
        dropped[keep] = False
        for member in group.members:
            key = (member.parameter, member.dim)
            mask = keep_masks.setdefault(key, torch.ones(originals[member.parameter].shape[member.dim], dtype=torch.bool))
            mask[member.offset + torch.nonzero(dropped).flatten()] = False
    sliced: dict[str, torch.Tensor] = {}
    for (name, dim), mask in sorted(keep_masks.items()):
        base = sliced.get(name, originals[name])
        sliced[name] = base.index_select(dim, torch.nonzero(mask).flatten())
    current = _tensors(model)
    for name, original in originals.items():
        if name in sliced or current[name].shape != original.shape:
            _set_tensor(model, name, sliced.get(name, original).clone())


def _set_tensor(model: torch.jit.ScriptModule, name: str, value: torch.Tensor) -> None:
    path, _, attribute = name.rpartition(".")
    module = model
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    if attribute in dict(module.named_parameters(recurse=False)):
        value = torch.nn.Parameter(value, requires_grad=False)
    setattr(module, attribute, value)


def _tensors(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _check_batches(data: Dataset) -> list[tuple[torch.Tensor, ...]]:
    """A batch of one and a batch of eight: pruning must not break other batch sizes."""
    first = data.head(1)
    eight = tuple(t.expand(8, *t.shape[1:]).contiguous() for t in first) if len(data) < 8 else data.head(8)
    return [first, eight]


def _failure(model: torch.jit.ScriptModule, batches: list[tuple[torch.Tensor, ...]]) -> str | None:
    try:
        for batch in batches:
            run_model(model, batch)
    except InvalidInput as error:
        return str(error)
    return None


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
