"""Slicing channel groups: every tensor of a chosen group cut to its kept channels, in place on the
model (or, for the proof's reference, kept at full size with the dropped entries zeroed)."""

from __future__ import annotations

import torch

from workers.engine.analysis.channels import ChannelGroup, Member


def materialize(
    model: torch.jit.ScriptModule,
    originals: dict[str, torch.Tensor],
    chosen: list[tuple[ChannelGroup, torch.Tensor]],
    masked: bool = False,
) -> None:
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
    current = tensors(model)
    for name, original in originals.items():
        value = changed.get(name, original)
        if current[name].shape != value.shape or not torch.equal(current[name], value):
            set_tensor(model, name, value.clone())


def _dropped(
    chosen: list[tuple[ChannelGroup, torch.Tensor]], originals: dict[str, torch.Tensor]
) -> dict[tuple[str, int], torch.Tensor]:
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


def _entries(member: Member, channels: torch.Tensor) -> torch.Tensor:
    """Indices along ``member.dim`` of the given channels (each owns ``scale`` consecutive entries)."""
    return member.offset + (channels[:, None] * member.scale + torch.arange(member.scale)).flatten()


def _slice(tensor: torch.Tensor, dim: int, kept: torch.Tensor) -> torch.Tensor:
    """The kept entries of ``tensor`` along ``dim`` (the one place a pruned tensor is cut)."""
    return tensor.index_select(dim, kept)


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


def tensors(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}
