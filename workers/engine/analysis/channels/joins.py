"""Ops that tie channel spaces together: elementwise ops on two tensors (a residual addition, a
per-channel scale) and concatenations (part of ``walk.ChannelAnalysis``)."""

from __future__ import annotations

import dataclasses
import math

import torch

from workers.engine.analysis.channels.spaces import Axis, ChannelSpace
from workers.engine.analysis.channels.values import constant


def _segments(space: ChannelSpace) -> list[ChannelSpace]:
    """The plain spaces a (possibly concatenated) space is made of, in channel order."""
    space = space.root()
    return [segment for part in space.parts for segment in _segments(part)] if space.parts is not None else [space]


class Joins:
    """Two or more tensors meet: their spaces become one, or one space of segments (a cat)."""

    def _binary(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        left, right = self.axis_of.get(inputs[0]), self.axis_of.get(inputs[1])
        if (left is not None and left.head_width) or (right is not None and right.head_width):
            return self._join_heads(node, inputs, left, right)
        out = node.output()
        if left is not None and right is not None:
            dims = self._dim(inputs[0], left), self._dim(inputs[1], right)
            shapes = self.values.get(inputs[0]), self.values.get(inputs[1])
            aligned = None not in dims and None not in shapes and (len(shapes[0]) - dims[0] == len(shapes[1]) - dims[1])
            if left.scale != right.scale or not (aligned or left.dim == right.dim):
                self._block(left.space, f"{node.kind()} joins channels at different places")
                self._block(right.space, f"{node.kind()} joins channels at different places")
            space = self._union(left.space, right.space)
            winner = left if shapes[0] is None or shapes[1] is None or len(shapes[0]) >= len(shapes[1]) else right
            self._set(out, Axis(space, winner.dim if winner is left else right.dim, left.scale))
            return
        axis = left or right
        if axis is None:
            return
        operand = inputs[1] if left is not None else inputs[0]
        own = inputs[0] if left is not None else inputs[1]
        if operand.type().kind() == "TensorType":
            self._broadcast(node, own, axis, operand)
        self._set(out, axis)

    def _broadcast(self, node: torch._C.Node, own: torch._C.Value, axis: Axis, operand: torch._C.Value) -> None:
        """A tensor without channels of its own meets ours: a per-channel parameter is a member, a scalar is fine."""
        shape, dim = self.values.get(own), self._dim(own, axis)
        name = self.attribute_of.get(operand)
        other = tuple(self.shapes[name]) if name in self.shapes else self.values.get(operand)
        if other is None and operand.node().kind() == "prim::Constant":  # folded into the graph: in a trace
            folded = constant(operand)  # of a program, its lifted constants (a tensor, or a number typed Tensor)
            other = tuple(folded.shape) if isinstance(folded, torch.Tensor) else () if folded is not None else None
        if other is not None and math.prod(other) == 1:
            return
        if shape is None or dim is None or other is None:
            return self._block(axis.space, f"{node.kind()} with a tensor of unknown channels")
        position = dim - (len(shape) - len(other))
        if position < 0 or other[position] == 1:
            return  # broadcast along the channels: the same value for each
        if name is not None and axis.scale is not None and other[position] == shape[dim]:
            return self._attach(axis, name, dim=position)
        self._block(axis.space, f"{node.kind()} with a tensor of unknown channels")

    def _cat(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        items = self.items_of.get(inputs[0])
        dim = constant(inputs[1])
        # cat skips 1-D empty tensors (an empty key/value cache, ``torch.tensor([])``, joined to the new keys),
        # whatever axis an op the analysis does not model gave them (``lift_fresh_copy`` in a traced program)
        items = [v for v in items or [] if self.values.get(v) != (0,)]
        if not items or not isinstance(dim, int):
            return self._opaque(node)
        axes = [self.axis_of.get(v) for v in items]
        shape = self.values.get(node.output())
        if shape is not None:
            dim %= len(shape)
        dims = {self._dim(v, a) for v, a in zip(items, axes) if a is not None}
        if any(a is None for a in axes) or len(dims) != 1 or None in dims:
            return self._opaque(node, "aten::cat of tensors with unknown channels")
        channel_dim = dims.pop()
        heads = {(a.head_width, a.inner) for a in axes}
        if any(a.head_width for a in axes) and (len(heads) != 1 or dim == channel_dim):
            return self._opaque(node, "aten::cat of attention heads along the heads or with other channels")
        if dim != channel_dim:  # joined along another dimension (tokens, a rotated half of each head): channels agree
            space = axes[0].space
            for other in axes[1:]:
                space = self._union(space, other.space)
            return self._set(node.output(), dataclasses.replace(axes[0], space=space, dim=channel_dim))
        if any(a.scale != 1 for a in axes):
            return self._opaque(node, "aten::cat of flattened channels")
        space = self._new()
        # A concatenation of concatenations (an Inception block's pass-through pool of the previous
        # block's output) is one flat list of segments.
        space.parts = [segment for a in axes for segment in _segments(a.space)]
        self._set(node.output(), Axis(space, channel_dim))

    def _split(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        """``split`` / ``chunk`` unpacked into pieces: along the channels each piece is a segment of
        the space (the inverse of a cat: a fused q/k/v projection); along another dimension each
        piece keeps the axis."""
        axis = self.axis_of.get(inputs[0])
        unpacks = [use.user for use in node.output().uses()]
        if axis is None:
            return
        if len(unpacks) != 1 or unpacks[0].kind() != "prim::ListUnpack":
            return self._opaque(node, f"{node.kind()} not unpacked into its pieces")
        pieces = list(unpacks[0].outputs())
        shape, along = self.values.get(inputs[0]), constant(inputs[2]) if len(inputs) > 2 else 0
        dim = self._dim(inputs[0], axis)
        sizes = [self.values.get(p) for p in pieces]
        if shape is None or dim is None or not isinstance(along, int) or None in sizes:
            return self._opaque(node, f"{node.kind()} of unknown shape")
        self.items_of[node.output()] = pieces
        if along % len(shape) != dim:
            for piece in pieces:
                self._set(piece, axis)
            return
        space = axis.space.root()
        if (
            axis.scale != 1
            or axis.head_width
            or space.parts is not None
            or space.unit != 1
            or space.norms
            or space.size != shape[dim]
        ):
            return self._opaque(node, f"{node.kind()} of channels that are not one plain segment")
        # The space becomes a concatenation of its pieces: each member's entries split the same way.
        parts, offset = [], 0
        for piece, piece_shape in zip(pieces, sizes):
            part = self._new(size=piece_shape[dim])
            part.blocked = list(space.blocked)
            part.members = [
                dataclasses.replace(m, offset=m.offset + offset * m.scale, length=part.size * m.scale)
                for m in space.members
            ]
            offset += part.size
            parts.append(part)
            self._set(piece, Axis(part, dim))
        space.members, space.parts = [], parts
