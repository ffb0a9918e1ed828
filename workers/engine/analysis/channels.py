"""Groups of coupled channels, read from a TorchScript graph.

Pruning one output channel of a conv means removing the same channel from everything that
shares it: the BatchNorm after it, the input channels of its consumers, every tensor joined to
it by an elementwise op (a residual addition or a squeeze-and-excitation scale ties two channel
spaces into one group), and the rows of a depthwise conv that reads it. A concatenation along
channels makes a consumer's input a sequence of segments, one per input.

The analysis walks a canonical copy of ``forward`` (``torchscript.canonical_graph``: inlined,
module flags folded, dead branches gone), giving each activation an *axis*: the channel space
its channel dimension indexes, where that dimension is, and how many entries each channel
covers there (``scale``: 1 for a conv output, H*W after a flatten, the multiplier after a
depthwise conv). Each space collects the parameter slices (*members*) that index it. Shapes
come from one run of the graph on the example inputs. A space that reaches an op the analysis
does not model, the model's inputs or outputs, or a reshape that splits channels is *blocked*:
it is left whole, with the reason kept for the report. Torch-Pruning's dependency graph
(VainF/Torch-Pruning) is the reference for which ops couple what.

A ``layer_norm`` over the channel dimension couples its weight and bias like a BatchNorm, but
it also computes statistics over the channels: removing some changes the mean and variance of
the rest. Such a space records the norm (its ordinal among the graph's ``aten::layer_norm``
nodes, ``Norm``) so the check after slicing can build a reference whose statistics cover the
kept channels only (``prune.py``), and the report can say the group was renormalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from workers.engine.analysis.torchscript_graph import canonical_graph, value_shapes

# Ops whose output has the same channels, at the same place, as their first input.
_CHANNEL_PRESERVING = {
    "aten::relu", "aten::relu_", "aten::relu6", "aten::relu6_", "aten::hardtanh", "aten::hardtanh_",
    "aten::sigmoid", "aten::sigmoid_", "aten::tanh", "aten::tanh_", "aten::hardswish", "aten::hardswish_",
    "aten::hardsigmoid", "aten::hardsigmoid_", "aten::gelu", "aten::gelu_", "aten::silu", "aten::silu_",
    "aten::elu", "aten::elu_", "aten::leaky_relu", "aten::leaky_relu_", "aten::mish", "aten::softplus",
    "aten::dropout", "aten::dropout_", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout",
    "aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::avg_pool1d", "aten::avg_pool2d",
    "aten::avg_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool3d",
    "aten::adaptive_max_pool1d", "aten::adaptive_max_pool2d", "aten::adaptive_max_pool3d",
    "aten::contiguous", "aten::clone", "aten::detach", "aten::to", "aten::abs", "aten::neg", "aten::exp",
    "aten::square", "aten::pad", "aten::constant_pad_nd", "aten::upsample_nearest2d", "aten::upsample_bilinear2d",
    "aten::erf",
}
# Elementwise ops with two operands: two tensors tie their spaces; a scalar leaves the space alone.
_ELEMENTWISE_BINARY = {
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
}
# Ops that only read a tensor's shape: they constrain nothing.
_SHAPE_QUERIES = {"aten::size", "aten::dim", "aten::len", "prim::shape", "aten::numel", "prim::device", "prim::dtype",
                  "aten::__isnot__", "aten::__is__", "prim::is_cuda", "prim::Uninitialized", "prim::RaiseException",
                  "aten::format", "aten::warn"}
# Reshapes that keep the order of elements: the channel axis keeps, merges with the dims after it, or splits.
_RESHAPES = {"aten::flatten", "aten::view", "aten::reshape", "aten::squeeze", "aten::unsqueeze", "aten::unflatten",
             "aten::squeeze_", "aten::unsqueeze_"}
_REDUCTIONS = {"aten::mean", "aten::sum", "aten::amax", "aten::amin"}
_CONVOLUTIONS = {"aten::conv1d": 1, "aten::conv2d": 2, "aten::conv3d": 3, "aten::conv_transpose1d": 1,
                 "aten::conv_transpose2d": 2, "aten::conv_transpose3d": 3, "aten::_convolution": 0,
                 "aten::convolution": 0}


@dataclass(frozen=True)
class Member:
    """``length`` entries of ``parameter`` along ``dim``, from ``offset``, index this space's channels.

    Channel ``c`` owns the ``scale`` consecutive entries from ``offset + c * scale``.
    """

    parameter: str
    dim: int
    offset: int
    length: int
    producer: bool  # the slice that creates the channels (a conv/linear output), not a consumer's input
    scale: int = 1
    kind: str = ""  # for producers: the layer type the op stands for (Conv2d, Linear, ...)


@dataclass(frozen=True)
class Norm:
    """The ``index``-th ``aten::layer_norm`` of the canonical graph normalises this space's channels.

    Channel ``c`` owns the ``scale`` consecutive entries from ``c * scale`` of its last dimension.
    """

    index: int
    scale: int = 1


@dataclass
class ChannelSpace:
    ident: int
    size: int | None = None
    unit: int = 1  # channels are removed in aligned blocks of this many (whole groups of a grouped conv)
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    parts: list["ChannelSpace"] | None = None  # set for a concatenation
    parent: "ChannelSpace | None" = None
    norms: list[Norm] = field(default_factory=list)

    def root(self) -> "ChannelSpace":
        space = self
        while space.parent is not None:
            space = space.parent
        return space


@dataclass(frozen=True)
class _Axis:
    """Where a value's channels are: ``space``, at dimension ``dim``, ``scale`` entries per channel (None: unknown yet)."""

    space: ChannelSpace
    dim: int
    scale: int | None = 1


@dataclass
class ChannelGroup:
    """Channels that must be pruned together, in aligned blocks of ``unit``."""

    name: str  # the first producing layer
    size: int
    members: list[Member]
    blocked: list[str]
    unit: int = 1
    norms: list[Norm] = field(default_factory=list)  # layer_norms whose statistics change when it shrinks

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.producer]


def channel_groups(model: torch.jit.ScriptModule, shapes: dict[str, torch.Size],
                   example: tuple[torch.Tensor, ...] | None = None) -> list[ChannelGroup]:
    """All channel groups of ``model``; ``shapes`` maps parameter and buffer names to their shapes.

    ``example`` (a few rows of each input) lets the analysis learn the shape of every value.
    """
    graph = canonical_graph(model)
    values = value_shapes(model, graph, example) if example is not None else {}
    analysis = _Analysis(shapes, values, layer_norm_nodes(graph))
    analysis.run(graph)
    return analysis.groups()


def layer_norm_nodes(graph: torch._C.Graph) -> list[torch._C.Node]:
    """Every ``aten::layer_norm`` of ``graph``, nested blocks included, in one fixed order: ``Norm.index``."""
    return [node for node in _nested_nodes(graph.block()) if node.kind() == "aten::layer_norm"]


def layer_name(parameter: str) -> str:
    """The layer a parameter belongs to: its module, or the parameter itself for a functional model's tensor."""
    return parameter.rpartition(".")[0] or parameter


class _Analysis:
    def __init__(self, shapes: dict[str, torch.Size], values: dict[torch._C.Value, tuple[int, ...]],
                 layer_norms: list[torch._C.Node]) -> None:
        self.shapes = shapes
        self.values = values
        self.layer_norm_index = {node: index for index, node in enumerate(layer_norms)}
        self.spaces: list[ChannelSpace] = []
        self.axis_of: dict[torch._C.Value, _Axis] = {}
        self.attribute_of: dict[torch._C.Value, str] = {}
        self.items_of: dict[torch._C.Value, list[torch._C.Value]] = {}  # lists and tuples

    # ------------------------------------------------------------------ walking the graph

    def run(self, graph: torch._C.Graph) -> None:
        inputs = list(graph.inputs())
        self.attribute_of[inputs[0]] = ""  # self
        for value in inputs[1:]:
            if value.type().kind() == "TensorType":
                self.axis_of[value] = _Axis(self._new(blocked="model input (its channels are fixed)"), dim=-1)
        for node in graph.nodes():
            self._visit(node)
        for value in graph.outputs():
            self._block_value(value, "model output (its shape is kept)")

    def _visit(self, node: torch._C.Node) -> None:
        kind = node.kind()
        inputs = list(node.inputs())
        if kind == "prim::GetAttr":
            owner = self.attribute_of.get(inputs[0])
            if owner is not None:
                name = node.s("name")
                self.attribute_of[node.output()] = f"{owner}.{name}" if owner else name
            return
        if kind == "prim::Constant" or kind in _SHAPE_QUERIES:
            return
        if kind in _CONVOLUTIONS:
            return self._conv(node, inputs)
        if kind == "aten::linear":
            return self._linear(node, inputs)
        if kind in ("aten::batch_norm", "aten::instance_norm"):
            return self._norm(node, inputs, inputs[1:5], dim=1)
        if kind == "aten::layer_norm":
            return self._layer_norm(node, inputs)
        if kind == "aten::group_norm":
            return self._opaque(node, "group_norm (num_groups is compiled into the model)")
        if kind == "aten::embedding":
            return self._embedding(node, inputs)
        if kind in _CHANNEL_PRESERVING:
            return self._preserve(node, inputs)
        if kind in ("aten::softmax", "aten::log_softmax"):
            return self._along(node, inputs, reduces=False)
        if kind in _RESHAPES:
            return self._reshape(node, inputs)
        if kind in ("aten::transpose", "aten::permute"):
            return self._move(node, inputs)
        if kind in _REDUCTIONS:
            return self._reduce(node, inputs)
        if kind in ("aten::select", "aten::slice"):
            return self._along(node, inputs, reduces=kind == "aten::select")
        if kind in _ELEMENTWISE_BINARY:
            return self._binary(node, inputs)
        if kind == "aten::cat":
            return self._cat(node, inputs)
        if kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            self.items_of[node.output()] = list(inputs)
            return
        if kind == "aten::append" and inputs[0] in self.items_of:
            self.items_of[inputs[0]].append(inputs[1])
            self.items_of[node.output()] = self.items_of[inputs[0]]
            return
        if kind in ("prim::TupleUnpack", "prim::ListUnpack") and inputs[0] in self.items_of:
            for value, item in zip(node.outputs(), self.items_of[inputs[0]]):
                self._alias(value, item)
            return
        if kind in ("prim::TupleIndex", "aten::__getitem__") and inputs[0] in self.items_of:
            index = _constant(inputs[1])
            items = self.items_of[inputs[0]]
            if isinstance(index, int) and -len(items) <= index < len(items):
                return self._alias(node.output(), items[index])
        if kind == "prim::If":
            return self._branch(node)
        self._opaque(node)

    def _alias(self, value: torch._C.Value, item: torch._C.Value) -> None:
        if item in self.axis_of:
            self.axis_of[value] = self.axis_of[item]
        if item in self.items_of:
            self.items_of[value] = self.items_of[item]

    # ------------------------------------------------------------------ layers

    def _conv(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        kind = node.kind()
        weight, bias = self.attribute_of.get(inputs[1]), self.attribute_of.get(inputs[2])
        if weight is None or weight not in self.shapes:
            return self._opaque(node, f"{kind} with a computed weight")
        shape = self.shapes[weight]
        if kind in ("aten::_convolution", "aten::convolution"):
            transposed, groups = bool(_constant(inputs[6])), _constant(inputs[8])
        else:
            transposed, groups = "transpose" in kind, _constant(inputs[6])
        layer = f"{'ConvTranspose' if transposed else 'Conv'}{len(shape) - 2}d"
        module = layer_name(weight)
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        axis = self._input_axis(inputs[0], f"{layer} {module}", dim=1)
        if groups == 1:
            if axis is not None:
                self._attach(axis, weight, dim=in_dim)
            self._set(node.output(), _Axis(self._produce(layer, weight, bias, out_dim), dim=1))
            return
        reason = self._grouped(axis, weight, groups, transposed)
        if reason is not None:
            if axis is not None:
                self._block(axis.space, reason)
            self._set(node.output(), _Axis(self._new(blocked=reason), dim=1))
            return
        # Each output group reads one input group: the output is the input's space, k_out/k_in entries a channel.
        per_group_in, per_group_out = shape[1], shape[0] // groups
        space = axis.space.root()
        space.unit = math.lcm(space.unit, per_group_in)
        scale = per_group_out // per_group_in
        self._attach(_Axis(space, 1, scale), weight, dim=0)
        if bias is not None:
            self._attach(_Axis(space, 1, scale), bias, dim=0)
        self._set(node.output(), _Axis(space, dim=1, scale=scale))

    def _grouped(self, axis: _Axis | None, weight: str, groups: object, transposed: bool) -> str | None:
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
        weight = self.attribute_of.get(inputs[1])
        if weight is None or weight not in self.shapes or len(self.shapes[weight]) != 2:
            return self._opaque(node, "aten::linear with a computed weight")
        axis = self._input_axis(inputs[0], f"Linear {layer_name(weight)}", dim=-1)
        if axis is not None:
            self._attach(axis, weight, dim=1)
        self._set(node.output(), _Axis(self._produce("Linear", weight, self.attribute_of.get(inputs[2]), 0), dim=-1))

    def _embedding(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        weight = self.attribute_of.get(inputs[0])
        if weight is None or weight not in self.shapes:
            return self._opaque(node)
        space = self._new(size=int(self.shapes[weight][1]))
        space.members.append(Member(weight, 1, 0, space.size, producer=True, kind="Embedding"))
        self._set(node.output(), _Axis(space, dim=-1))

    def _norm(self, node: torch._C.Node, inputs: list[torch._C.Value], tensors: list[torch._C.Value], dim: int) -> None:
        axis = self._input_axis(inputs[0], node.kind(), dim=dim)
        if axis is None:
            return self._opaque(node)
        for value in tensors:
            self._attach(axis, self.attribute_of.get(value), dim=0)
        self._set(node.output(), axis)

    def _layer_norm(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        normalized = _constant(inputs[1])
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

    # ------------------------------------------------------------------ data movement

    def _preserve(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        for value in inputs[1:]:
            if value in self.axis_of:
                self._block_value(value, f"second tensor operand of {node.kind()}")
        if axis is None:
            return
        before, after = self.values.get(inputs[0]), self.values.get(node.output())
        dim = self._dim(inputs[0], axis)
        if before is not None and after is not None and (dim is None or len(before) != len(after)
                                                         or before[dim] != after[dim]):
            return self._opaque(node, f"{node.kind()} changes the channel dimension")
        self._set(node.output(), axis)

    def _along(self, node: torch._C.Node, inputs: list[torch._C.Value], reduces: bool) -> None:
        """softmax / slice / select along one dimension: fine unless it is the channel dimension."""
        axis = self.axis_of.get(inputs[0])
        if axis is None:
            return self._opaque(node)
        dim, along = self._dim(inputs[0], axis), _constant(inputs[1])
        rank = len(self.values[inputs[0]]) if inputs[0] in self.values else None
        if dim is None or not isinstance(along, int) or rank is None:
            return self._opaque(node, f"{node.kind()} along an unknown dimension")
        along %= rank
        if along == dim:
            return self._opaque(node, f"{node.kind()} across the channel dimension")
        self._set(node.output(), _Axis(axis.space, dim - (1 if reduces and along < dim else 0), axis.scale))

    def _reduce(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        dims = _constant(inputs[1]) if len(inputs) > 1 else None
        keep = _constant(inputs[2]) if len(inputs) > 2 else False
        shape = self.values.get(inputs[0])
        if axis is None or shape is None or not isinstance(dims, list) or not dims:
            return self._opaque(node, f"{node.kind()} over all or unknown dimensions")
        dim = self._dim(inputs[0], axis)
        dims = [d % len(shape) for d in dims]
        if dim is None or dim in dims:
            return self._opaque(node, f"{node.kind()} across the channel dimension")
        self._set(node.output(), _Axis(axis.space, dim if keep else dim - sum(d < dim for d in dims), axis.scale))

    def _reshape(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        if axis is None:
            return self._opaque(node)
        before, after = self.values.get(inputs[0]), self.values.get(node.output())
        dim = self._dim(inputs[0], axis)
        if before is None or after is None or dim is None:
            if node.kind() == "aten::flatten" and _constant(inputs[1]) == axis.dim and axis.dim >= 0:
                return self._set(node.output(), _Axis(axis.space, axis.dim, None))
            return self._opaque(node, f"{node.kind()} of unknown shape")
        prefix = math.prod(before[:dim])
        inner = math.prod(before[dim + 1:])
        for position in range(len(after)):
            if math.prod(after[:position]) != prefix or after[position] % before[dim]:
                continue
            merged = after[position] // before[dim]
            if inner % merged or math.prod(after[position + 1:]) != inner // merged:
                continue
            scale = None if axis.scale is None else axis.scale * merged
            return self._set(node.output(), _Axis(axis.space, position, scale))
        self._opaque(node, f"{node.kind()} splits the channel dimension (e.g. a channel shuffle or attention heads)")

    def _move(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        axis = self.axis_of.get(inputs[0])
        shape = self.values.get(inputs[0])
        if axis is None or shape is None or self._dim(inputs[0], axis) is None:
            return self._opaque(node, f"{node.kind()} of unknown shape")
        dim, rank = self._dim(inputs[0], axis), len(shape)
        if node.kind() == "aten::permute":
            order = _constant(inputs[1])
            if not isinstance(order, list):
                return self._opaque(node)
            new = [d % rank for d in order].index(dim)
        else:
            first, second = _constant(inputs[1]), _constant(inputs[2])
            if not isinstance(first, int) or not isinstance(second, int):
                return self._opaque(node)
            first, second = first % rank, second % rank
            new = second if dim == first else first if dim == second else dim
        self._set(node.output(), _Axis(axis.space, new, axis.scale))

    def _binary(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        left, right = self.axis_of.get(inputs[0]), self.axis_of.get(inputs[1])
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
            self._set(out, _Axis(space, winner.dim if winner is left else right.dim, left.scale))
            return
        axis = left or right
        if axis is None:
            return
        operand = inputs[1] if left is not None else inputs[0]
        own = inputs[0] if left is not None else inputs[1]
        if operand.type().kind() == "TensorType":
            self._broadcast(node, own, axis, operand)
        self._set(out, axis)

    def _broadcast(self, node: torch._C.Node, own: torch._C.Value, axis: _Axis, operand: torch._C.Value) -> None:
        """A tensor without channels of its own meets ours: a per-channel parameter is a member, a scalar is fine."""
        shape, dim = self.values.get(own), self._dim(own, axis)
        name = self.attribute_of.get(operand)
        other = tuple(self.shapes[name]) if name in self.shapes else self.values.get(operand)
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
        dim = _constant(inputs[1])
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
        if dim != channel_dim:  # joined along another dimension (tokens, say): the channels must agree
            space = axes[0].space
            for other in axes[1:]:
                space = self._union(space, other.space)
            return self._set(node.output(), _Axis(space, channel_dim, axes[0].scale))
        if any(a.scale != 1 for a in axes):
            return self._opaque(node, "aten::cat of flattened channels")
        space = self._new()
        space.parts = [a.space.root() for a in axes]
        self._set(node.output(), _Axis(space, channel_dim))

    def _branch(self, node: torch._C.Node) -> None:
        """A real branch: analyse both arms; a value leaving it has one space, agreed by both arms."""
        for block in node.blocks():
            for inner in block.nodes():
                self._visit(inner)
        arms = [list(block.outputs()) for block in node.blocks()]
        for index, value in enumerate(node.outputs()):
            if value.type().kind() != "TensorType":
                continue
            candidates = [arm[index] for arm in arms if arm[index].node().kind() != "prim::Uninitialized"]
            axes = [self.axis_of.get(v) for v in candidates]
            if not axes or any(a is None for a in axes):
                for candidate in candidates:
                    self._block_value(candidate, "leaves a branch with a tensor of unknown channels")
                self._set(value, _Axis(self._new(blocked="a branch output of unknown channels"), dim=-1))
                continue
            space = axes[0].space
            for other in axes[1:]:
                if other.dim != axes[0].dim or other.scale != axes[0].scale:
                    self._block(space, "the arms of a branch put channels in different places")
                space = self._union(space, other.space)
            self._set(value, _Axis(space, axes[0].dim, axes[0].scale))

    def _opaque(self, node: torch._C.Node, why: str | None = None) -> None:
        """An op we do not model: every space it reads is left whole, its outputs are unknown."""
        reason = f"used by {why or node.kind() + ', which pruning does not model'}"
        for value in node.inputs():
            self._block_value(value, reason)
        for block in node.blocks():
            for inner in _nested_nodes(block):
                if inner.kind() in _SHAPE_QUERIES:
                    continue
                for value in inner.inputs():
                    self._block_value(value, f"used inside {node.kind()}")
        for value in node.outputs():
            if value.type().kind() == "TensorType":
                self.axis_of[value] = _Axis(self._new(blocked=f"output of {node.kind()}"), dim=-1)

    # ------------------------------------------------------------------ axes and spaces

    def _dim(self, value: torch._C.Value, axis: _Axis) -> int | None:
        """The channel dimension of ``value``, counted from the front (None if the rank is unknown)."""
        shape = self.values.get(value)
        if axis.dim >= 0:
            return axis.dim
        return axis.dim % len(shape) if shape is not None else None

    def _input_axis(self, value: torch._C.Value, consumer: str, dim: int) -> _Axis | None:
        """The axis of a layer's input, if its channels are where the layer reads them (dim 1, or last for -1)."""
        axis = self.axis_of.get(value)
        if axis is None:
            return None
        shape = self.values.get(value)
        where = self._dim(value, axis)
        expected = dim if dim >= 0 or shape is None else dim % len(shape)
        if where is None:
            ok = axis.dim == dim
        else:
            ok = where == expected
        if not ok:
            self._block(axis.space, f"{consumer} reads a dimension other than the channels")
            return None
        return axis

    def _set(self, value: torch._C.Value, axis: _Axis) -> None:
        shape = self.values.get(value)
        dim = self._dim(value, axis)
        if shape is not None and dim is not None and axis.dim >= 0 and dim >= len(shape):
            self._block(axis.space, "the channel dimension was lost")
        self.axis_of[value] = axis

    def _new(self, blocked: str | None = None, size: int | None = None) -> ChannelSpace:
        space = ChannelSpace(ident=len(self.spaces), size=size)
        if blocked:
            space.blocked.append(blocked)
        self.spaces.append(space)
        return space

    def _produce(self, layer: str, weight: str, bias: str | None, dim: int) -> ChannelSpace:
        size = int(self.shapes[weight][dim])
        space = self._new(size=size)
        space.members.append(Member(weight, dim, 0, size, producer=True, kind=layer))
        if bias is not None and bias in self.shapes:
            space.members.append(Member(bias, 0, 0, size, producer=True, kind=layer))
        return space

    def _attach(self, axis: _Axis, parameter: str | None, dim: int) -> None:
        """``parameter`` indexes the channels of ``axis`` along ``dim`` (per concatenated segment for a cat)."""
        if parameter is None or parameter not in self.shapes or len(self.shapes[parameter]) <= dim:
            return
        space = axis.space.root()
        entries = int(self.shapes[parameter][dim])
        if space.parts is None:
            scale = axis.scale
            if scale is None and space.size and entries % space.size == 0:
                scale = entries // space.size  # a flatten: the consumer's width says how much it merged
            if scale is None or space.size is None or space.size * scale != entries:
                self._block(space, f"{parameter} has {entries} entries for {space.size} channels (a reshape fixes the count)")
                return
            space.members.append(Member(parameter, dim, 0, entries, producer=False, scale=scale))
            return
        offset = 0
        scale = axis.scale or 1
        for part in space.parts:
            part = part.root()
            if part.size is None or part.parts is not None:
                self._block(space, "a concatenated input of unknown channels")
                return
            part.members.append(Member(parameter, dim, offset, part.size * scale, producer=False, scale=scale))
            offset += part.size * scale
        if offset != entries:
            self._block(space, f"{parameter} does not match the concatenation's channels")

    def _union(self, left: ChannelSpace, right: ChannelSpace) -> ChannelSpace:
        left, right = left.root(), right.root()
        if left is right:
            return left
        if left.parts is not None or right.parts is not None:
            self._block(left, "a concatenation joined by an elementwise op")
            self._block(right, "a concatenation joined by an elementwise op")
        if left.size is not None and right.size is not None and left.size != right.size:
            self._block(left, f"joins {left.size} channels with {right.size}")
        right.parent = left
        left.size = left.size if left.size is not None else right.size
        left.unit = math.lcm(left.unit, right.unit)
        left.members.extend(right.members)
        left.norms.extend(right.norms)
        left.blocked.extend(r for r in right.blocked if r not in left.blocked)
        right.members, right.blocked, right.norms = [], [], []
        return left

    def _block(self, space: ChannelSpace, reason: str) -> None:
        root = space.root()
        if reason not in root.blocked:
            root.blocked.append(reason)
        for part in root.parts or []:
            self._block(part, reason)

    def _block_value(self, value: torch._C.Value, reason: str, seen: set | None = None) -> None:
        axis = self.axis_of.get(value)
        if axis is not None:
            self._block(axis.space, reason)
        seen = set() if seen is None else seen
        if value in self.items_of and id(self.items_of[value]) not in seen:
            seen.add(id(self.items_of[value]))
            for item in self.items_of[value]:
                self._block_value(item, reason, seen)

    # ------------------------------------------------------------------ result

    def groups(self) -> list[ChannelGroup]:
        found = []
        for space in self.spaces:
            if space.parent is not None or space.parts is not None or not space.members:
                continue
            producers = [m for m in space.members if m.producer]
            if not producers or space.size is None:
                continue
            blocked = list(space.blocked)
            if space.size % space.unit:
                blocked.append(f"{space.size} channels do not split into groups of {space.unit}")
            found.append(ChannelGroup(name=layer_name(producers[0].parameter), size=space.size,
                                      members=space.members, blocked=blocked, unit=space.unit, norms=space.norms))
        return found


def _constant(value: torch._C.Value) -> object:
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        items = [_constant(v) for v in node.inputs()]
        return None if any(i is None for i in items) else items
    return None


def _nested_nodes(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nested_nodes(inner)


