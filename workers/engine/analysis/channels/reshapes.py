"""Ops on one tensor that keep, move or merge its channel dimension: activations, softmax, slices,
reductions, reshapes, transposes (part of ``walk.ChannelAnalysis``)."""

from __future__ import annotations

import math

import torch

from workers.engine.analysis.channels.spaces import Axis, Member, Norm
from workers.engine.analysis.channels.values import constant


class Reshapes:
    """Where the channels of an op's output are, given its input's."""

    def _preserve(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        for value in inputs[1:]:
            if value in self.axis_of:
                self._block_value(value, f"second tensor operand of {node.kind()}")
        if axis is None:
            return
        before, after = self.values.get(inputs[0]), self.values.get(node.output())
        dim = self._dim(inputs[0], axis)
        if (
            before is not None
            and after is not None
            and (dim is None or len(before) != len(after) or before[dim] != after[dim])
        ):
            return self._opaque(node, f"{node.kind()} changes the channel dimension")
        self._set(node.output(), axis)

    def _along(self, node: torch._C.Node, inputs: list[torch._C.Value], reduces: bool) -> None:
        """softmax / slice / select along one dimension: fine unless it is the channel dimension."""
        axis = self.axis_of.get(inputs[0])
        if axis is None:
            return self._opaque(node)
        dim, along = self._dim(inputs[0], axis), constant(inputs[1])
        rank = len(self.values[inputs[0]]) if inputs[0] in self.values else None
        if dim is None or not isinstance(along, int) or rank is None:
            return self._opaque(node, f"{node.kind()} along an unknown dimension")
        along %= rank
        if along == dim and node.kind() == "aten::slice" and _whole(inputs):
            return self._set(node.output(), axis)  # x[..., :] (transformers' logits_to_keep=0): every channel
        if along == dim:
            return self._opaque(node, f"{node.kind()} across the channel dimension")
        self._set(
            node.output(),
            self._relocated(
                axis, lambda d: None if reduces and d == along else d - (1 if reduces and along < d else 0), dim
            ),
        )

    def _reduce(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        dims = constant(inputs[1]) if len(inputs) > 1 else None
        keep = constant(inputs[2]) if len(inputs) > 2 else False
        shape = self.values.get(inputs[0])
        if axis is None or shape is None or not isinstance(dims, list) or not dims:
            return self._opaque(node, f"{node.kind()} over all or unknown dimensions")
        dim = self._dim(inputs[0], axis)
        dims = [d % len(shape) for d in dims]
        space = axis.space.root()
        if (
            node in self.layer_norm_index
            and dims == [dim] == [len(shape) - 1]  # the last dimension, which the proof's reference masks
            and space.parts is None
            and axis.scale is not None
        ):
            # An RMSNorm's mean of squares: a statistic per row (no channels), over the kept channels once
            # sliced; the check after slicing builds its reference so (``Norm``, as for a layer_norm).
            space.norms.append(Norm(self.layer_norm_index[node], axis.scale))
            return
        if dim is None or dim in dims:
            return self._opaque(node, f"{node.kind()} across the channel dimension")
        self._set(
            node.output(),
            self._relocated(axis, lambda d: d if keep else None if d in dims else d - sum(r < d for r in dims), dim),
        )

    def _expand(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        """``expand`` broadcasts dimensions of size 1: the channels stay where they were (counted from the
        end). An expanded parameter (a ViT's class token, ``[1, 1, C]``, to the batch) indexes a space of
        its last dimension, joined to the patches' by the concatenation along tokens that follows."""
        axis, before, after = self.axis_of.get(inputs[0]), self.values.get(inputs[0]), self.values.get(node.output())
        if before is None or after is None or len(after) < len(before):
            return self._opaque(node, "aten::expand of unknown shape")
        if axis is None:
            name = self.attribute_of.get(inputs[0])
            if name not in self.shapes or len(before) < 2 or before[-1] < 2:
                return self._opaque(node)
            space = self._new(size=before[-1])
            space.members.append(Member(name, len(before) - 1, 0, before[-1], producer=False))
            return self._set(node.output(), Axis(space, dim=len(after) - 1))
        dim = self._dim(inputs[0], axis)
        if axis.head_width or dim is None or after[dim + len(after) - len(before)] != before[dim]:
            return self._opaque(node)
        self._set(node.output(), self._relocated(axis, lambda d: d + len(after) - len(before), dim))

    def _reshape(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        if axis is None:
            return self._opaque(node)
        before, after = self.values.get(inputs[0]), self.values.get(node.output())
        dim = self._dim(inputs[0], axis)
        if axis.head_width:
            return self._reshape_heads(node, axis, before, after)
        if before is None or after is None or dim is None:
            if node.kind() == "aten::flatten" and constant(inputs[1]) == axis.dim and axis.dim >= 0:
                return self._set(node.output(), Axis(axis.space, axis.dim, None))
            return self._opaque(node, f"{node.kind()} of unknown shape")
        prefix = math.prod(before[:dim])
        inner = math.prod(before[dim + 1 :])
        for position in range(len(after)):
            if math.prod(after[:position]) != prefix or after[position] % before[dim]:
                continue
            merged = after[position] // before[dim]
            if inner % merged or math.prod(after[position + 1 :]) != inner // merged:
                continue
            scale = None if axis.scale is None else axis.scale * merged
            return self._set(node.output(), Axis(axis.space, position, scale))
        if not self._split_heads(node, axis, before, after, dim):
            self._opaque(node, f"{node.kind()} splits the channel dimension (e.g. a channel shuffle)")

    def _move(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        shape = self.values.get(inputs[0])
        if axis is None or shape is None or self._dim(inputs[0], axis) is None:
            return self._opaque(node, f"{node.kind()} of unknown shape")
        dim, rank = self._dim(inputs[0], axis), len(shape)
        if node.kind() == "aten::permute":
            order = constant(inputs[1])
            if not isinstance(order, list):
                return self._opaque(node)
            order = [d % rank for d in order]
            self._set(node.output(), self._relocated(axis, order.index, dim))
        else:
            first, second = constant(inputs[1]), constant(inputs[2])
            if not isinstance(first, int) or not isinstance(second, int):
                return self._opaque(node)
            first, second = first % rank, second % rank
            self._set(
                node.output(),
                self._relocated(axis, lambda d: second if d == first else first if d == second else d, dim),
            )


def _whole(inputs: list[torch._C.Value]) -> bool:
    """An ``aten::slice`` (self, dim, start, end, step) from the start to the end, step 1, written as
    constants: it keeps every channel whatever their number (an end at the size would not, once pruned)."""
    if len(inputs) != 5 or any(value.node().kind() != "prim::Constant" for value in inputs[2:]):
        return False
    start, end, step = (value.toIValue() for value in inputs[2:])
    return start in (None, 0) and (end is None or end >= 2**62) and step == 1
