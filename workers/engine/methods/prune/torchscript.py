"""Pruning of a TorchScript model: individual weights (unstructured) or whole channels (structured).

Unstructured pruning zeroes the smallest-magnitude weights (``weights``); the file stays dense
(same bytes) but compresses well, and sparse kernels can use it. Structured pruning removes channels for
real, so the model gets smaller and faster: every tensor in a coupled group
(``analysis/channels``) is sliced by the same kept indices (``analysis/slicing``, proven by
``analysis/proof``), in place on the ScriptModule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from modelpress.options import PruneOptions
from workers.engine.analysis.channels import ChannelGroup, channel_groups, layer_name
from workers.engine.analysis.channels.values import nested_nodes
from workers.engine.analysis.proof import check_batches, mismatch, same_outputs
from workers.engine.analysis.slicing import materialize, snapshot, tensors, untied
from workers.engine.errors import InvalidInput, NothingToPrune, summarize_torch_error
from workers.engine.formats.torchscript import clone_model
from workers.engine.inputs import Dataset
from workers.engine.linear_forms import is_matmul_weight
from workers.engine.measure import count_macs
from workers.engine.methods.prune.importance import Ranking, regularize
from workers.engine.methods.prune.schedule import AfterStep, merge_channel_reports, run_schedule
from workers.engine.methods.prune.weights import apply_masks, prune_weights
from workers.engine.methods.training import finetune
from workers.engine.torchscript_graph import (
    canonical_graph,
    matching_pattern,
    module_types,
    quiet_torchscript_warnings,
)
from workers.engine.torchscript_sizes import derive_conv_groups, derive_layer_norm_shapes, derive_reshape_sizes

Progress = Callable[[str, float], None]


def prune(
    model: torch.jit.ScriptModule,
    options: PruneOptions,
    data: Dataset,
    progress: Progress | None = None,
    fixed_batch: int | None = None,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Prune ``model`` in place as ``options`` say; return it and what was done.

    ``fixed_batch``: the model accepts only batches of that many rows (a program exported without
    a dynamic batch); the analysis and the proof of each slicing then run at that size alone.

    Importance of a weight is ``|w|``; of a channel, by ``options.importance`` (``importance``): the L1
    (or L2) norm of its slices in the group's producing weights, each normalised by that tensor's
    mean slice norm, or its BatchNorm scale / group norm after a sparsity-training phase
    (``options.regularize``). ``options.schedule`` reaches the amount in steps (``schedule``).
    """
    progress = progress or (lambda stage, fraction: None)
    if (options.finetune or options.regularize) and data.synthetic:
        raise InvalidInput(
            f"{'sparsity training' if options.regularize else 'fine-tuning'} needs a data file; "
            "random inputs teach the model nothing"
        )
    teacher = clone_model(model) if options.finetune or options.regularize else None
    selected = set(options.modules)
    exclude, excluded_by_default = _exclusions(model, options.exclude)
    types = module_types(model)
    batch = data.head(8)
    macs_before = _counted_macs(model, batch)

    progress("ranking", 0.05)
    regularized = None
    if options.regularize:
        groups = channel_groups(
            model, {name: t.shape for name, t in tensors(model).items()}, data.exactly(fixed_batch or 2)
        )
        reasons = _reasons_for(groups, selected, exclude, options)
        targets = [group for group in groups if not reasons(group)]
        if targets:  # none: nothing to prune, which the first step reports with the reasons per group
            regularized = regularize(model, options, targets, data, teacher, progress)
    units: dict[str, int] = {}  # each group's channel units before the first step
    kept: dict[str, torch.Tensor] = {}  # each pruned group's original channels still there

    def prune_step(
        model: torch.jit.ScriptModule, amount: float
    ) -> tuple[torch.jit.ScriptModule, dict[str, Any], AfterStep]:
        step_options = dataclasses.replace(options, amount=amount)
        if options.structured:
            model, details, accepted = _prune_channels(
                model, step_options, selected, exclude, types, data, progress, fixed_batch, units
            )
            for key, size, keep in accepted:
                kept[key] = kept.get(key, torch.arange(size))[keep]
            return model, details, None
        details, masks = prune_weights(model, step_options, selected, exclude, types, _linear_weights(model))
        return model, details, (lambda: apply_masks(model, masks)) if masks else None

    def train(model: torch.jit.ScriptModule, epochs: int, after_step: AfterStep, index: int) -> list[dict[str, float]]:
        training = options.finetune
        assert training is not None
        steps = options.schedule.steps if options.schedule else 1
        return finetune(
            model,
            data,
            teacher,
            epochs=epochs,
            lr=training.lr,
            batch_size=training.batch_size,
            seed=training.seed + index,
            after_step=after_step,
            progress=lambda stage, fraction: progress(stage, 0.5 + 0.45 * (index + fraction) / steps),
        )

    if options.schedule:
        merge = (lambda reports: merge_channel_reports(reports, kept)) if options.structured else (lambda r: r[-1])
        model, details = run_schedule(model, options, prune_step, train, merge)
    else:
        model, details, after_step = prune_step(model, options.amount)
        if options.finetune:
            details["finetune"] = train(model, options.finetune.epochs, after_step, 0)
    if regularized is not None:
        details["regularize"] = regularized
        details.setdefault("warnings", []).extend(regularized.pop("warnings", []))
    macs_after = _counted_macs(model, batch)
    if isinstance(macs_before, int) and isinstance(macs_after, int):
        details["macs"] = {
            "before": macs_before,
            "after": macs_after,
            "batch_shape": list(batch[0].shape),
            "counted": "convolutions and matrix multiplies (torch.utils.flop_counter, FLOPs / 2)",
        }
    else:
        details["notes"].append(
            f"multiply-accumulates not counted: {macs_before if isinstance(macs_before, str) else macs_after}"
        )
    if excluded_by_default:
        details["notes"].append(
            f"the final classifier {excluded_by_default!r} is excluded by default (set 'exclude' to change)"
        )
    if not options.structured and options.criterion == "l2":
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


# ---------------------------------------------------------------------------- structured


def _group_reasons(
    group: ChannelGroup, selected: set[str], exclude: list[str], hidden: bool | None = None, user_exclude=()
) -> list[str]:
    """Why a group is left whole whatever the amount (empty: it can be pruned).

    ``hidden``: the group is a transformer's hidden width (``hidden_widths``): True when
    ``prune.hidden`` asks for it (its embeddings count as selected, excluded only by the user's
    ``user_exclude``: the default exclusion of the final classifier names a tied output embedding,
    whose vocabulary stays either way), False when it stays whole.
    """
    reasons = list(group.blocked)
    if hidden is False:
        reasons.append("the hidden (residual) width: set prune.hidden: true to prune it with its embeddings and norms")
    for layer, kind in sorted({(layer_name(m.parameter), m.kind) for m in group.producers}):
        if kind == "Embedding" and hidden is not None:
            if hidden and (pattern := matching_pattern(layer, list(user_exclude))) is not None:
                reasons.append(f"{layer} is excluded by pattern {pattern!r}")
        elif kind not in selected:
            reasons.append(f"{layer} is a {kind}, not a selected type")
        elif (pattern := matching_pattern(layer, exclude)) is not None:
            reasons.append(f"{layer} is excluded by pattern {pattern!r}")
    return reasons


def _reasons_for(
    groups: list[ChannelGroup], selected: set[str], exclude: list[str], options: PruneOptions
) -> Callable[[ChannelGroup], list[str]]:
    """``_group_reasons`` of each of ``groups``, which of them are hidden widths read once."""
    hidden = hidden_widths(groups)
    return lambda group: _group_reasons(
        group, selected, exclude, options.hidden if id(group) in hidden else None, options.exclude or ()
    )


def hidden_widths(groups: list[ChannelGroup]) -> set[int]:
    """The ``id`` of each group that is a transformer's hidden (residual) width: one an embedding makes,
    or one a layer_norm normalises that the projections making attention heads read (a ConvNeXt's
    normalised residual streams read by no attention are ordinary groups)."""
    heads = {m.parameter for group in groups if group.head_width for m in group.producers}
    return {
        id(group)
        for group in groups
        if any(m.kind == "Embedding" for m in group.producers)
        or (group.norms and any(not m.producer and m.parameter in heads for m in group.members))
    }


def _prune_channels(
    model,
    options: PruneOptions,
    selected,
    exclude,
    types,
    data: Dataset,
    progress: Progress,
    fixed_batch: int | None = None,
    original_units: dict[str, int] | None = None,
) -> tuple[torch.jit.ScriptModule, dict[str, Any], list[tuple[str, int, torch.Tensor]]]:
    """The pruned model, the report, and per pruned group its key, its channels before and the kept ones.

    ``original_units``: each group's units (by key) before the first step of a schedule (filled in
    for groups not in it yet); a group keeps its share of those, not of the channels it has now."""
    amount = options.amount
    criterion = options.criterion
    original_units = {} if original_units is None else original_units
    originals = snapshot(model)
    groups = channel_groups(model, {name: t.shape for name, t in originals.items()}, data.exactly(fixed_batch or 2))
    ranking = Ranking(model, options.importance)
    candidates: list[tuple[ChannelGroup, torch.Tensor]] = []
    left_whole = []
    keys = {id(group): key for key, group in zip(group_keys(groups), groups)}
    reasons_of = _reasons_for(groups, selected, exclude, options)
    for group in groups:
        reasons = reasons_of(group)
        units = group.size // group.unit
        share = original_units.setdefault(keys[id(group)], units) * (1.0 - amount)
        keep_units = min(units, max(1, int(round(share))))
        if not reasons and keep_units >= units:
            what = f"{units} groups of {group.unit} channels" if group.unit > 1 else f"{group.size} channels"
            reasons.append(f"{what} are too few to prune at amount {amount}")
        if reasons:
            left_whole.append({"group": group.name, "channels": group.size, "reason": "; ".join(reasons)})
            continue
        scores = ranking(group, originals).view(units, group.unit).sum(1)
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
    if candidates:  # literal sizes in reshapes and splits (Conv1D's nf, GPT-2's q/k/v split) follow the channels
        reshaped = clone_model(model)
        if derive_reshape_sizes(reshaped):
            reshaped = clone_model(reshaped)
            if same_outputs(model, reshaped, checks):  # exact by construction; checked, not assumed
                model = reshaped
    accepted: list[tuple[ChannelGroup, torch.Tensor]] = []
    if candidates:
        progress("checking groups", 0.1)
        if mismatch(model, originals, candidates, checks) is None:
            accepted = list(candidates)
        else:  # find the groups that break the model, one at a time
            for index, candidate in enumerate(candidates):
                problem = mismatch(model, originals, accepted + [candidate], checks)
                if problem is None:
                    accepted.append(candidate)
                else:
                    left_whole.append(
                        {"group": candidate[0].name, "channels": candidate[0].size, "reason": f"put back: {problem}"}
                    )
                progress("checking groups", 0.1 + 0.3 * (index + 1) / len(candidates))
    materialize(model, originals, accepted)
    # Weights no group indexes (an LSTM's, an op the analysis does not model): name their layers.
    covered = {m.parameter for group in groups for m in group.members}
    unmodelled = sorted(
        {
            f"{layer_name(name)} ({types.get(layer_name(name)) or 'functional'})"
            for name, tensor in originals.items()
            if tensor.dim() >= 2 and name not in covered
        }
    )
    if not accepted:
        reasons = "; ".join(f"{entry['group']}: {entry['reason']}" for entry in left_whole[:12])
        more = f" (and {len(left_whole) - 12} more groups)" if len(left_whole) > 12 else ""
        layers = f" Layers the channel analysis does not model: {', '.join(unmodelled[:12])}." if unmodelled else ""
        raise NothingToPrune(
            f"structured pruning can remove no channel group of this model, so nothing would "
            f"change. Reasons per group: {reasons or 'no conv or linear layer makes channels'}{more}."
            f"{layers}"[:4000]
        )

    pruned = [
        {
            "group": g.name,
            "channels_before": g.size,
            "channels_after": int(keep.numel()),
            "tensors": sorted({m.parameter for m in g.members}),
            **({"heads": _heads(g, keep)} if g.head_width else {}),
            **({"layer_norms_renormalised": len(g.norms)} if g.norms else {}),
        }
        for g, keep in accepted
    ]
    notes = []
    if renormalised := [g.name for g, _ in accepted if g.norms]:
        notes.append(
            f"pruned groups normalised by a layer_norm or an RMSNorm: {len(renormalised)} ({', '.join(renormalised[:6])}"
            f"{', ...' if len(renormalised) > 6 else ''}); those norms' mean and variance now cover the kept "
            "channels only, so outputs move further from the original than zeroing alone would (see "
            "fidelity); fine-tuning recovers it"
        )
    for names in untied(originals, accepted):
        notes.append(
            f"{' and '.join(names)} were one tensor (tied); they are sliced differently, so they are now "
            "separate tensors (more parameters than one shared copy)"
        )
    if ranking.fell_back:
        notes.append(
            f"importance bn_scale: no BatchNorm after {', '.join(ranking.fell_back[:8])}"
            f"{', ...' if len(ranking.fell_back) > 8 else ''}: ranked by the l1 norm of the weights instead"
        )
    return (
        model,
        {
            "structured": True,
            "criterion": criterion,
            "importance": options.importance,
            "groups": pruned,
            "left_whole": left_whole,
            "channels": {
                "before": sum(g.size for g, _ in accepted) + sum(e["channels"] for e in left_whole),
                "after": sum(int(k.numel()) for _, k in accepted) + sum(e["channels"] for e in left_whole),
            },
            "verified": "each pruned group matches the original with the same channels zeroed (and layer_norm "
            "statistics over the kept channels), on the example inputs",
            "layers_not_modelled": unmodelled,
            **(
                {"heads_kept": {entry["group"]: entry["heads"]["kept"] for entry in pruned if "heads" in entry}}
                if any("heads" in entry for entry in pruned)
                else {}
            ),
            "notes": notes,
        },
        [(keys[id(g)], g.size, keep) for g, keep in accepted],
    )


def group_keys(groups: list[ChannelGroup]) -> list[str]:
    """A name for each group that stays the same across a schedule's steps: its first producing layer,
    numbered from the second group of one layer on (a fused q/k/v projection makes three)."""
    seen: dict[str, int] = {}
    keys = []
    for group in groups:
        seen[group.name] = seen.get(group.name, 0) + 1
        keys.append(group.name if seen[group.name] == 1 else f"{group.name}#{seen[group.name]}")
    return keys


def _heads(group: ChannelGroup, keep: torch.Tensor) -> dict[str, Any]:
    """The attention heads of a pruned group: their width, how many there were, which were kept."""
    width = group.head_width
    return {"width": width, "before": group.size // width, "kept": sorted({int(channel) // width for channel in keep})}


def _reads_grouped_conv(group: ChannelGroup, tensors: dict[str, torch.Tensor]) -> bool:
    """A conv weight sliced along its output rows without producing the channels: a grouped conv's rows."""
    return any(not m.producer and m.dim == 0 and tensors[m.parameter].dim() >= 3 for m in group.members)


def _linear_weights(model: torch.jit.ScriptModule) -> set[str]:
    """Parameters the graph reads as the matrix of a product (``transformers``' ``Conv1D``: ``addmm``;
    ``x @ W``; ``F.linear``), whatever their module's class: each counts as a ``Linear`` layer's weight."""
    graph = canonical_graph(model)
    names: dict[torch._C.Value, str] = {next(iter(graph.inputs())): ""}
    found = set()
    parameters = {name for name, p in model.named_parameters() if p.dim() == 2}
    for node in nested_nodes(graph.block()):
        if node.kind() == "prim::GetAttr" and node.inputsAt(0) in names:
            owner = names[node.inputsAt(0)]
            name = f"{owner}.{node.s('name')}" if owner else node.s("name")
            names[node.output()] = name
            if name in parameters and any(is_matmul_weight(use) for use in node.output().uses()):
                found.add(name)
    return found


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
