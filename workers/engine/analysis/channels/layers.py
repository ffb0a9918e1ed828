"""Layers that make and read channels: convolutions (grouped too), linear, embedding and norms
(part of ``walk.ChannelAnalysis``)."""

from __future__ import annotations

import math

import torch

from workers.engine.analysis.channels.spaces import Axis, Member, Norm, layer_name
from workers.engine.analysis.channels.values import constant
from workers.engine.linear_forms import linear_read


class Layers:
    """A layer's weight reads the channels of its input and its output makes new ones."""

    def _conv(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        kind = node.kind()
        weight, bias = self.attribute_of.get(inputs[1]), self.attribute_of.get(inputs[2])
        if weight is None or weight not in self.shapes:
            return self._opaque(node, f"{kind} with a computed weight")
        shape = self.shapes[weight]
        if kind in ("aten::_convolution", "aten::convolution"):
            transposed, groups = bool(constant(inputs[6])), constant(inputs[8])
        else:
            transposed, groups = "transpose" in kind, constant(inputs[6])
        layer = f"{'ConvTranspose' if transposed else 'Conv'}{len(shape) - 2}d"
        module = layer_name(weight)
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        axis = self._input_axis(inputs[0], f"{layer} {module}", dim=1)
        if groups == 1:
            if axis is not None:
                self._attach(axis, weight, dim=in_dim)
            self._set(node.output(), Axis(self._produce(layer, weight, bias, out_dim), dim=1))
            return
        reason = self._grouped(axis, weight, groups, transposed)
        if reason is not None:
            if axis is not None:
                self._block(axis.space, reason)
            self._set(node.output(), Axis(self._new(blocked=reason), dim=1))
            return
        # Each output group reads one input group: the output is the input's space, k_out/k_in entries a channel.
        per_group_in, per_group_out = shape[1], shape[0] // groups
        space = axis.space.root()
        space.unit = math.lcm(space.unit, per_group_in)
        scale = per_group_out // per_group_in
        self._attach(Axis(space, 1, scale), weight, dim=0)
        if bias is not None:
            self._attach(Axis(space, 1, scale), bias, dim=0)
        self._set(node.output(), Axis(space, dim=1, scale=scale))

    def _grouped(self, axis: Axis | None, weight: str, groups: object, transposed: bool) -> str | None:
        """Why a grouped conv cannot shrink with its input, or None."""
        module = layer_name(weight)
        shape = self.shapes[weight]
        if not isinstance(groups, int):
            return f"grouped conv {module} with a computed groups argument"
        if transposed:
            return f"grouped transposed conv {module}"
        if axis is None or axis.space.root().parts is not None:
            return f"grouped conv {module} reads channels of unknown origin"
        per_group_in, per_group_out = shape[1], shape[0] // groups
        size = axis.space.root().size
        if axis.scale != 1 or size is None or size != groups * per_group_in:
            return f"grouped conv {module}: its input channels do not line up with its groups"
        if per_group_out % per_group_in:
            return f"grouped conv {module}: {per_group_out} outputs per group for {per_group_in} inputs"
        return None

    def _linear(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        """A linear layer in any spelling (``linear``, ``addmm``, ``matmul``/``mm`` with a parameter
        weight either way round: ``linear_forms``); a product of two activations is attention's."""
        found = linear_read(node, self._owned_shape)
        if found is None:
            if node.kind() in ("aten::matmul", "aten::bmm") and not any(v in self.attribute_of for v in inputs[:2]):
                return self._product(node, inputs)
            return self._opaque(node, f"{node.kind()} with a computed weight")
        weight_value, read = found
        weight = self.attribute_of[weight_value]
        in_dim, out_dim = (0, 1) if read.transposed else (1, 0)  # transposed: the weight is [in, out]
        axis = self._input_axis(read.input, f"Linear {layer_name(weight)}", dim=-1)
        if axis is not None:
            self._attach(axis, weight, dim=in_dim)
        # A folded ``+ b`` is its own add node, which attaches the bias as a per-channel member.
        bias = self.attribute_of.get(read.bias) if read.bias is not None and read.output is node.output() else None
        self._set(node.output(), Axis(self._produce("Linear", weight, bias, out_dim), dim=-1))

    def _owned_shape(self, value: torch._C.Value) -> tuple[int, ...] | None:
        """The shape of the parameter or buffer ``value`` reads, or None (an activation)."""
        name = self.attribute_of.get(value)
        return tuple(self.shapes[name]) if name in self.shapes else None

    def _embedding(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        weight = self.attribute_of.get(inputs[0])
        if weight is None or weight not in self.shapes:
            return self._opaque(node)
        space = self._new(size=int(self.shapes[weight][1]))
        space.members.append(Member(weight, 1, 0, space.size, producer=True, kind="Embedding"))
        self._set(node.output(), Axis(space, dim=-1))

    def _norm(self, node: torch._C.Node, inputs: list[torch._C.Value], tensors: list[torch._C.Value], dim: int) -> None:
        axis = self._input_axis(inputs[0], node.kind(), dim=dim)
        if axis is None:
            return self._opaque(node)
        for value in tensors:
            self._attach(axis, self.attribute_of.get(value), dim=0)
        self._set(node.output(), axis)

    def _layer_norm(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        normalized = constant(inputs[1])
        axis = self._input_axis(inputs[0], "layer_norm", dim=-1)
        if axis is None or not isinstance(normalized, list) or len(normalized) != 1:
            return self._opaque(node, "layer_norm over more than the channel dimension")
        space = axis.space.root()
        if space.parts is not None or axis.scale is None:
            return self._opaque(node, "layer_norm over concatenated or flattened channels")
        # Removing channels changes the mean and variance of the rest: the check after slicing
        # compares with a reference whose statistics cover the kept channels only.
        space.norms.append(Norm(self.layer_norm_index[node], axis.scale))
        for value in inputs[2:4]:
            self._attach(axis, self.attribute_of.get(value), dim=0)
        self._set(node.output(), axis)
