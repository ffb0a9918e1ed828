"""How channels are ranked for structured pruning, and the sparsity-training phase that some rankings need.

- ``l1`` / ``l2``: each channel's norm in the producing weights, each tensor's norms divided by
  their mean (for attention heads also the output projection's columns that read them).
- ``bn_scale`` (network slimming, Liu et al. 2017): an L1 penalty on the scales (gamma) of the
  BatchNorms in the prunable groups during a training phase pushes the scales of channels the
  model can do without toward zero; channels are then ranked by ``|gamma|`` (summed over the
  BatchNorms of a group, e.g. both sides of a residual addition).
- ``group_lasso``: the penalty is each channel's L2 norm over every trainable slice of its group
  (the producing rows, biases, BatchNorm scale and shift, the consumers' input columns: the
  members the channel analysis found), so a channel's slices shrink together; channels are then
  ranked by that norm.

The phase (``regularize``) is the one training loop (``methods.training.finetune``) with a penalty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modelpress.method_specs import FinetuneSpec
from modelpress.options import PruneOptions, typed
from workers.engine.analysis.channels import ChannelGroup, Member
from workers.engine.analysis.channels.values import nested_nodes
from workers.engine.errors import UnsupportedModel
from workers.engine.inputs import Dataset
from workers.engine.methods.training import finetune
from workers.engine.torchscript_graph import canonical_graph

Progress = Callable[[str, float], None]
SMALL_SCALE = 1e-2  # the report counts BatchNorm scales under this, epoch by epoch
SMALL_NORM = 1e-2  # ... and channel group norms under this fraction of their mean before the phase


def channel_rows(tensor: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The member's slice of ``tensor`` as ``[size, -1]``: row ``c`` holds every entry channel ``c`` owns."""
    rows = tensor.narrow(member.dim, member.offset, member.length).transpose(0, member.dim)
    return rows.reshape(size, -1)


def norm_importance(group: ChannelGroup, tensors: dict[str, torch.Tensor], criterion: str) -> torch.Tensor:
    """Each channel's norm in the producing weights (for attention heads also the output
    projection's columns that read them: a head is ranked by its q, k, v and out weights)."""
    score = torch.zeros(group.size)
    for member in group.members if group.head_width else group.producers:
        tensor = tensors[member.parameter]
        if tensor.dim() < 2:
            continue
        rows = channel_rows(tensor.detach().float(), member, group.size)
        norms = rows.abs().sum(1) if criterion == "l1" else rows.pow(2).sum(1).sqrt()
        score += norms / norms.mean().clamp(min=1e-12)
    return score


def scale_importance(group: ChannelGroup, tensors: dict[str, torch.Tensor], scales: set[str]) -> torch.Tensor | None:
    """Each channel's |gamma|, summed over the group's BatchNorms; None when the group has none."""
    members = [m for m in group.members if m.parameter in scales]
    if not members:
        return None
    return sum(channel_rows(tensors[m.parameter].detach().float(), m, group.size).abs().sum(1) for m in members)


def group_norms(group: ChannelGroup, tensors: dict[str, torch.Tensor], trainable: set[str]) -> torch.Tensor:
    """Each channel's L2 norm over all trainable slices of its group (differentiable: the penalty uses it)."""
    squares = sum(
        channel_rows(tensors[m.parameter], m, group.size).pow(2).sum(1)
        for m in group.members
        if m.parameter in trainable
    )
    return (squares + 1e-12).sqrt() if isinstance(squares, torch.Tensor) else torch.zeros(group.size)


class Ranking:
    """The channel scores of one model's groups by ``importance``; ``fell_back`` names the bn_scale groups
    without a BatchNorm, ranked by the l1 norm instead."""

    def __init__(self, model: torch.jit.ScriptModule, importance: str) -> None:
        self.importance = importance
        self.scales = batch_norm_scales(model) if importance == "bn_scale" else set()
        self.trainable = trainable_names(model) if importance == "group_lasso" else set()
        self.fell_back: list[str] = []

    def __call__(self, group: ChannelGroup, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.importance == "bn_scale":
            scores = scale_importance(group, tensors, self.scales)
            if scores is not None:
                return scores
            self.fell_back.append(group.name)
            return norm_importance(group, tensors, "l1")
        if self.importance == "group_lasso":
            return group_norms(group, tensors, self.trainable).detach().float()
        return norm_importance(group, tensors, self.importance)


def batch_norm_scales(model: torch.jit.ScriptModule) -> set[str]:
    """The parameters ``forward`` uses as the scale (weight) of an ``aten::batch_norm``."""
    graph = canonical_graph(model)
    names: dict[torch._C.Value, str] = {next(iter(graph.inputs())): ""}
    found = set()
    for node in nested_nodes(graph.block()):
        if node.kind() == "prim::GetAttr" and node.inputsAt(0) in names:
            owner = names[node.inputsAt(0)]
            names[node.output()] = f"{owner}.{node.s('name')}" if owner else node.s("name")
        elif node.kind() == "aten::batch_norm" and node.inputsAt(1) in names:
            found.add(names[node.inputsAt(1)])
    return found


def trainable_names(model: torch.jit.ScriptModule) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.is_floating_point()}


# ---------------------------------------------------------------------------- the sparsity-training phase


def regularize(
    model: torch.jit.ScriptModule,
    options: PruneOptions,
    groups: list[ChannelGroup],
    data: Dataset,
    teacher: torch.jit.ScriptModule,
    progress: Progress,
) -> dict[str, Any]:
    """Train ``model`` in place with the penalty of ``options.importance`` on the prunable ``groups``;
    return the phase's report: its settings and, per epoch, the losses and how small the penalised values got."""
    phase = options.regularize
    assert phase is not None
    parameters = dict(model.named_parameters())
    if options.importance == "bn_scale":
        penalty, measure, notes = _scale_penalty(model, groups, parameters, phase.strength)
    else:
        penalty, measure, notes = _norm_penalty(model, groups, parameters, phase.strength)
    training = options.finetune or typed(FinetuneSpec, FinetuneSpec().load({}))  # its batch size and seed
    before = measure()
    history = finetune(
        model,
        data,
        teacher,
        epochs=phase.epochs,
        lr=phase.lr,
        batch_size=training.batch_size,
        seed=training.seed,
        penalty=penalty,
        after_epoch=measure,
        progress=lambda stage, fraction: progress(
            f"sparsity training: {stage.removeprefix('fine-tuning ')}", 0.05 + 0.15 * fraction
        ),
    )
    return {
        "importance": options.importance,
        "strength": phase.strength,
        "epochs": phase.epochs,
        "lr": phase.lr,
        "before": before,
        "curve": history,
        **notes,
    }


def _scale_penalty(
    model: torch.jit.ScriptModule, groups: list[ChannelGroup], parameters: dict[str, torch.Tensor], strength: float
) -> tuple[Callable[[], torch.Tensor], Callable[[], dict[str, float]], dict[str, Any]]:
    scales = batch_norm_scales(model)
    penalised = [(group, m) for group in groups for m in group.members if m.parameter in scales]
    without = sorted(group.name for group in groups if not any(m.parameter in scales for m in group.members))
    if not penalised:
        names = ", ".join(group.name for group in groups[:12]) or "none"
        raise UnsupportedModel(
            "importance bn_scale ranks channels by the scale of the BatchNorm after the layer "
            f"that makes them, and no prunable channel group has one (prunable groups: {names}); "
            "use importance l1, l2 or group_lasso"
        )

    def slices() -> list[torch.Tensor]:
        return [channel_rows(parameters[m.parameter], m, group.size) for group, m in penalised]

    def penalty() -> torch.Tensor:
        return strength * sum(rows.abs().sum() for rows in slices())

    def measure() -> dict[str, float]:
        with torch.no_grad():
            values = torch.cat([rows.abs().flatten() for rows in slices()])
        return {
            "scale_mean": round(float(values.mean()), 6),
            f"scales_below_{SMALL_SCALE:g}": round(float((values < SMALL_SCALE).float().mean()), 6),
        }

    notes: dict[str, Any] = {
        "penalised": {
            "batch_norm_scales": sorted({m.parameter for _, m in penalised}),
            "channels": sum(group.size for group, _ in penalised),
        }
    }
    if without:
        notes["warnings"] = [
            f"importance bn_scale: {len(without)} prunable group(s) have no BatchNorm after the "
            f"layer making their channels ({', '.join(without[:8])}{', ...' if len(without) > 8 else ''}); "
            "they are ranked by the l1 norm of their weights instead"
        ]
    return penalty, measure, notes


def _norm_penalty(
    model: torch.jit.ScriptModule, groups: list[ChannelGroup], parameters: dict[str, torch.Tensor], strength: float
) -> tuple[Callable[[], torch.Tensor], Callable[[], dict[str, float]], dict[str, Any]]:
    trainable = trainable_names(model)
    with torch.no_grad():
        start = {group.name: float(group_norms(group, parameters, trainable).mean()) for group in groups}

    def penalty() -> torch.Tensor:
        return strength * sum(group_norms(group, parameters, trainable).sum() for group in groups)

    def measure() -> dict[str, float]:
        with torch.no_grad():
            norms = [group_norms(group, parameters, trainable) for group in groups]
        small = sum(int((n < SMALL_NORM * start[g.name]).sum()) for g, n in zip(groups, norms))
        channels = sum(group.size for group in groups)
        return {
            "group_norm_mean": round(float(torch.cat(norms).mean()), 6),
            f"norms_below_{SMALL_NORM:g}_of_start_mean": round(small / max(channels, 1), 6),
        }

    return (
        penalty,
        measure,
        {"penalised": {"groups": [group.name for group in groups], "channels": sum(group.size for group in groups)}},
    )
