"""Attention heads (part of ``walk.ChannelAnalysis``): the reshape that splits channels into heads,
the ops that keep heads apart (products batched over heads, ``scaled_dot_product_attention``,
elementwise ops and concatenations along other dimensions) and the reshape that merges them back.

Splitting channels ``[.., C]`` into ``[.., H, D]`` (``C = H * D``) does not end the channel space:
head ``h`` is channels ``h * D`` to ``(h + 1) * D``. While a value carries heads only whole heads can
go (the space's ``unit`` becomes a multiple of ``D``), and ``D`` itself, the dimension a head's
channels are summed over in ``q @ k^T``, is never sliced, so the attention scale ``1 / sqrt(D)``
keeps. q, k and v meet in a product batched over heads: their spaces become one, and once the
heads are merged back the output projection's inputs join it. The head count is read off the
graph's shapes, not compiled in: a reshape written with ``-1`` for the heads (as ``transformers``
writes them) follows the pruned width by itself; one with a literal head count makes the sliced
model fail, and the proof puts the group back. Torch-Pruning prunes heads the same way, from the
module's ``num_heads``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from workers.engine.analysis.channels.spaces import Axis
from workers.engine.analysis.channels.values import constant


class Attention:
    """Values whose channels are split into heads (``Axis.head_width``)."""

    def _split_heads(self, node: torch._C.Node, axis: Axis, before: list[int], after: list[int], dim: int) -> bool:
        """A reshape ``[.., C, ..] -> [.., H, D, ..]``: the output carries heads. False if it is no such split."""
        space = axis.space.root()
        if axis.scale != 1 or space.parts is not None or space.size != before[dim]:
            return False
        prefix, rest = math.prod(before[:dim]), math.prod(before[dim + 1 :])
        for position in range(len(after) - 1):
            heads, width = after[position], after[position + 1]
            if (
                heads > 1
                and width > 1
                and heads * width == before[dim]
                and math.prod(after[:position]) == prefix
                and math.prod(after[position + 2 :]) == rest
            ):
                if space.head_width not in (None, width):
                    self._block(space, f"split into heads of {width} and of {space.head_width} channels")
                space.unit = math.lcm(space.unit, width)
                space.head_width = width
                self._set(node.output(), Axis(space, position, 1, head_width=width, inner=position + 1))
                return True
        return False

    def _reshape_heads(
        self, node: torch._C.Node, axis: Axis, before: list[int] | None, after: list[int] | None
    ) -> None:
        """A reshape of a value with heads: the same shape, or heads and their channels merged back."""
        if before is None or after is None:
            return self._opaque(node, f"{node.kind()} of attention heads of unknown shape")
        if list(before) == list(after):
            return self._set(node.output(), axis)
        dim, inner = axis.dim, axis.inner
        if inner == dim + 1:
            prefix, rest = math.prod(before[:dim]), math.prod(before[inner + 1 :])
            for position in range(len(after)):
                if (
                    math.prod(after[:position]) == prefix
                    and after[position] == before[dim] * before[inner]
                    and math.prod(after[position + 1 :]) == rest
                ):
                    return self._set(node.output(), Axis(axis.space, position, 1))
        self._opaque(node, f"{node.kind()} reshapes attention heads other than merging them back")

    def _product(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        """``a @ b`` of two activations: attention's ``q @ k^T`` or ``scores @ v``, batched over heads."""
        a, b = self.axis_of.get(inputs[0]), self.axis_of.get(inputs[1])
        shapes = self.values.get(inputs[0]), self.values.get(inputs[1])
        why = f"{node.kind()} of two activations other than attention heads"
        if a is None or b is None or not a.head_width or not b.head_width or None in shapes:
            return self._opaque(node, why)
        rank = len(shapes[0])
        if len(shapes[1]) != rank or a.dim != b.dim or a.dim >= rank - 2 or a.head_width != b.head_width:
            return self._opaque(node, why)
        if (
            a.inner not in (None, rank - 2, rank - 1)
            or b.inner not in (None, rank - 2, rank - 1)
            or (a.inner == rank - 1) != (b.inner == rank - 2)
        ):
            return self._opaque(node, f"{node.kind()} sums a head's channels with another dimension")
        inner = a.inner if a.inner == rank - 2 else b.inner if b.inner == rank - 1 else None
        space = self._union(a.space, b.space)
        self._set(node.output(), Axis(space, a.dim, 1, head_width=a.head_width, inner=inner))

    def _attention(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        """``scaled_dot_product_attention(q, k, v, mask, ...)``: q, k and v lose the same heads."""
        axes = [self.axis_of.get(v) for v in inputs[:3]]
        shapes = [self.values.get(v) for v in inputs[:3]]
        if any(a is None or not a.head_width for a in axes) or None in shapes:
            return self._opaque(node, "scaled_dot_product_attention of inputs without heads")
        rank = len(shapes[0])
        if (
            any(len(s) != rank for s in shapes)
            or len({(a.dim, a.inner, a.head_width) for a in axes}) != 1
            or axes[0].inner != rank - 1
            or axes[0].dim >= rank - 2
        ):
            return self._opaque(node, "scaled_dot_product_attention with heads at different places")
        if len(inputs) > 7 and constant(inputs[7]) not in (False, None):
            return self._opaque(node, "scaled_dot_product_attention with grouped key/value heads")
        mask = self.values.get(inputs[3]) if inputs[3].type().kind() == "TensorType" else None
        position = axes[0].dim - (rank - len(mask)) if mask is not None else -1
        if position >= 0 and mask[position] != 1:
            return self._opaque(node, "scaled_dot_product_attention with a mask per head")
        space = self._union(self._union(axes[0].space, axes[1].space), axes[2].space)
        self._set(node.output(), dataclasses.replace(axes[0], space=space))

    def _join_heads(
        self, node: torch._C.Node, inputs: list[torch._C.Value], left: Axis | None, right: Axis | None
    ) -> None:
        """An elementwise op where a value with heads meets another: the same heads, or a tensor
        broadcast over them (attention scores plus a mask, q times rotary cos/sin)."""
        out = node.output()
        shapes = self.values.get(inputs[0]), self.values.get(inputs[1])
        result = self.values.get(out)
        if (
            left is not None
            and right is not None
            and not (left.head_width and right.head_width)
            and None not in shapes
            and result is not None
        ):
            heads, other, own_shape, other_shape = (
                (left, right, shapes[0], shapes[1]) if left.head_width else (right, left, shapes[1], shapes[0])
            )
            position = heads.dim - (len(own_shape) - len(other_shape))
            if position < 0 or other_shape[position] == 1:  # the same for every head (rotary cos/sin)
                self._block(other.space, f"{node.kind()} meets the channels within attention heads")
                return self._set(out, self._shifted(heads, len(result) - len(own_shape)))
        if left is not None and right is not None:
            if (
                None in shapes
                or result is None
                or not (left.head_width and right.head_width)
                or left.head_width != right.head_width
                or left.dim - len(shapes[0]) != right.dim - len(shapes[1])
            ):
                self._block(left.space, f"{node.kind()} joins attention heads with other channels")
                self._block(right.space, f"{node.kind()} joins attention heads with other channels")
                return self._set(out, Axis(self._new(blocked=f"output of {node.kind()} of heads"), dim=-1))
            winner, own = (left, shapes[0]) if len(shapes[0]) >= len(shapes[1]) else (right, shapes[1])
            space = self._union(left.space, right.space)
            return self._set(out, self._shifted(dataclasses.replace(winner, space=space), len(result) - len(own)))
        axis, own, operand = (left, inputs[0], inputs[1]) if left is not None else (right, inputs[1], inputs[0])
        own_shape = self.values.get(own)
        if operand.type().kind() != "TensorType":
            return self._set(out, axis)
        name = self.attribute_of.get(operand)
        other = tuple(self.shapes[name]) if name in self.shapes else self.values.get(operand)
        if own_shape is None or other is None or result is None:
            return self._block(axis.space, f"{node.kind()} of attention heads with a tensor of unknown shape")
        position = axis.dim - (len(own_shape) - len(other))
        if position >= 0 and other[position] != 1:
            return self._block(axis.space, f"{node.kind()} of attention heads with a tensor per head")
        self._set(out, self._shifted(axis, len(result) - len(own_shape)))

    @staticmethod
    def _shifted(axis: Axis, by: int) -> Axis:
        """``axis`` in a broadcast result with ``by`` more leading dimensions."""
        inner = None if axis.inner is None else axis.inner + by
        return dataclasses.replace(axis, dim=axis.dim + by, inner=inner)
