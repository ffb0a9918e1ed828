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
    for names in _tied_names(originals):
        values = [changed[name] for name in names if name in changed]
        if values and all(v.shape == values[0].shape and torch.equal(v, values[0]) for v in values):
            # One slicing for a tied tensor: every name gets the one new tensor (the tracer reads a tied
            # output layer through the embedding's name, so the other name would keep a stale copy).
            targets = dict.fromkeys(names, values[0])
        else:
            targets = {name: changed.get(name, originals[name]) for name in names}
        copy = None
        for name, value in targets.items():
            if current[name].shape != value.shape or not torch.equal(current[name], value):
                if copy is None or copy.shape != value.shape or not torch.equal(copy, value):
                    copy = value.clone()
                    if isinstance(current[name], torch.nn.Parameter):  # one Parameter object for every tied name
                        copy = torch.nn.Parameter(copy, requires_grad=False)
                set_tensor(model, name, copy)


def snapshot(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of ``model`` by name; names of one tensor (a language model's
    output layer tied to its token embedding) share one copy, so ``materialize`` keeps them tied."""
    copies: dict[tuple, torch.Tensor] = {}
    return {
        name: copies.setdefault(_identity(tensor), tensor.detach().clone()) for name, tensor in tensors(model).items()
    }


def _tied_names(originals: dict[str, torch.Tensor]) -> list[list[str]]:
    """The names of each tensor, grouped: ``snapshot`` gave the names of one tensor one original object."""
    tied: dict[int, list[str]] = {}
    for name, original in originals.items():
        tied.setdefault(id(original), []).append(name)
    return list(tied.values())


def _identity(tensor: torch.Tensor) -> tuple:
    """Two names hold one tensor when they see the same memory the same way (a transposed view of a
    weight shares its storage, offset and shape, but not its strides: it is another tensor)."""
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def untied(originals: dict[str, torch.Tensor], chosen: list[tuple[ChannelGroup, torch.Tensor]]) -> list[list[str]]:
    """The names of each tied tensor (``snapshot``) that ``chosen`` slices differently: they become separate tensors."""
    dropped = _dropped(chosen, originals)
    found = []
    for names in _tied_names(originals):
        cuts = {
            tuple((dim, tuple(mask.tolist())) for (owner, dim), mask in sorted(dropped.items()) if owner == name)
            for name in names
        }
        if len(cuts) > 1:
            found.append(names)
    return found


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
    if attribute in dict(module.named_parameters(recurse=False)) and not isinstance(value, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=requires_grad)
    setattr(module, attribute, value)


def tensors(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, each name of a tied tensor included."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
