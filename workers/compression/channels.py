"""Groups of coupled channels, read from a TorchScript graph.

Pruning one output channel of a conv means removing the same channel from everything that
shares it: the BatchNorm after it, the input channels of its consumers, and every tensor
joined to it by a residual addition (which ties two channel spaces into one group). A
concatenation along channels makes a consumer's input a sequence of segments, one per input.

The analysis walks the inlined ``forward`` graph once, giving each activation a *channel
space* and each space the list of parameter slices (*members*) that index it. A space that
reaches an op it does not understand, the model's inputs or outputs, a grouped conv, or a
reshape is *blocked*: it is left whole, with the reason kept for the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .torchscript import quiet_torchscript_warnings

# Ops whose output has the same channels as their first input.
_CHANNEL_PRESERVING = {
    "aten::relu", "aten::relu_", "aten::relu6", "aten::relu6_", "aten::hardtanh", "aten::hardtanh_",
    "aten::sigmoid", "aten::sigmoid_", "aten::tanh", "aten::tanh_", "aten::hardswish", "aten::hardswish_",
    "aten::hardsigmoid", "aten::hardsigmoid_", "aten::gelu", "aten::silu", "aten::silu_", "aten::elu",
    "aten::elu_", "aten::leaky_relu", "aten::leaky_relu_", "aten::dropout", "aten::dropout_",
    "aten::feature_dropout", "aten::alpha_dropout", "aten::max_pool2d", "aten::avg_pool2d",
    "aten::adaptive_avg_pool2d", "aten::adaptive_max_pool2d", "aten::contiguous", "aten::clone",
    "aten::detach", "aten::mish", "aten::softplus",
}
# Elementwise ops with two operands: two tensors tie their spaces; a scalar leaves the space alone.
_ELEMENTWISE_BINARY = {
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
}
# Ops that only read a tensor's shape: they constrain nothing.
_SHAPE_QUERIES = {"aten::size", "aten::dim", "aten::len", "prim::shape", "aten::numel", "prim::device", "prim::dtype",
                  "aten::__isnot__", "aten::__is__", "prim::is_cuda"}


@dataclass(frozen=True)
class Member:
    """``length`` entries of ``parameter`` along ``dim``, starting at ``offset``, index this space's channels."""

    parameter: str
    dim: int
    offset: int
    length: int
    producer: bool  # the slice that creates the channels (a conv/linear output), not a consumer's input


@dataclass
class ChannelSpace:
    ident: int
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    parts: list["ChannelSpace"] | None = None  # set for a concatenation
    producer_module: str | None = None
    parent: "ChannelSpace | None" = None

    def root(self) -> "ChannelSpace":
        space = self
        while space.parent is not None:
            space = space.parent
        return space


@dataclass
class ChannelGroup:
    """Channels that must be pruned together."""

    name: str  # the first producing module
    size: int
    members: list[Member]
    blocked: list[str]

    @property
    def prunable(self) -> bool:
        return not self.blocked


def channel_groups(model: torch.jit.ScriptModule, shapes: dict[str, torch.Size]) -> list[ChannelGroup]:
    """All channel groups of ``model``; ``shapes`` maps parameter and buffer names to their shapes."""
    with quiet_torchscript_warnings():
        graph = model.inlined_graph
    analysis = _Analysis(shapes)
    analysis.run(graph)
    return analysis.groups()


class _Analysis:
    def __init__(self, shapes: dict[str, torch.Size]) -> None:
        self.shapes = shapes
        self.spaces: list[ChannelSpace] = []
        self.space_of: dict[torch._C.Value, ChannelSpace] = {}
        self.attribute_of: dict[torch._C.Value, str] = {}

    # ------------------------------------------------------------------ walking the graph

    def run(self, graph: torch._C.Graph) -> None:
        inputs = list(graph.inputs())
        self.attribute_of[inputs[0]] = ""  # self
        for value in inputs[1:]:
            self.space_of[value] = self._new(blocked="model input (its channels are fixed)")
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
        if kind == "aten::conv2d":
            return self._conv(node, inputs)
        if kind == "aten::linear":
            return self._linear(node, inputs)
        if kind == "aten::batch_norm":
            space = self.space_of.get(inputs[0])
            if space is not None:
                for value in inputs[1:5]:
                    self._attach(space, self.attribute_of.get(value), dim=0)
                self.space_of[node.output()] = space
            return
        if kind in _CHANNEL_PRESERVING:
            space = self.space_of.get(inputs[0])
            self._block_other_inputs(node, inputs[1:])
            if space is not None:
                self.space_of[node.output()] = space
            return
        if kind == "aten::flatten":
            return self._flatten(node, inputs)
        if kind in _ELEMENTWISE_BINARY:
            return self._binary(node, inputs)
        if kind == "aten::cat":
            return self._cat(node, inputs)
        if kind == "prim::ListConstruct":
            return  # judged by its consumer (cat), or blocked below when used elsewhere
        self._opaque(node)

    def _conv(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        weight = self.attribute_of.get(inputs[1])
        bias = self.attribute_of.get(inputs[2])
        groups = inputs[6].toIValue() if inputs[6].node().kind() == "prim::Constant" else None
        space_in = self.space_of.get(inputs[0])
        module = weight.rpartition(".")[0] if weight else None
        if weight is None:
            return self._opaque(node)
        if groups != 1:
            reason = f"grouped or depthwise conv {module} (groups is compiled into the model)"
            if space_in is not None:
                self._block(space_in, reason)
            self.space_of[node.output()] = self._new(blocked=reason, producer_module=module)
            return
        if space_in is not None:
            self._attach(space_in, weight, dim=1)
        self.space_of[node.output()] = self._produce(module, weight, bias)

    def _linear(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        weight = self.attribute_of.get(inputs[1])
        if weight is None:
            return self._opaque(node)
        space_in = self.space_of.get(inputs[0])
        if space_in is not None:
            self._attach(space_in, weight, dim=1)
        self.space_of[node.output()] = self._produce(weight.rpartition(".")[0], weight, self.attribute_of.get(inputs[2]))

    def _flatten(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        # flatten(x, 1) keeps channels only when each channel is one value (after global pooling);
        # otherwise the consumer's input size is channels x H x W and the size check blocks the group.
        start = inputs[1].toIValue() if inputs[1].node().kind() == "prim::Constant" else None
        space = self.space_of.get(inputs[0])
        if space is not None and start == 1:
            self.space_of[node.output()] = space
        else:
            self._opaque(node)

    def _binary(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        left, right = self.space_of.get(inputs[0]), self.space_of.get(inputs[1])
        if left is not None and right is not None:
            self.space_of[node.output()] = self._union(left, right)
        elif left is not None or right is not None:
            operand = inputs[1] if left is not None else inputs[0]
            if operand.type().kind() == "TensorType" and not self._is_scalar_attribute(operand):
                # A tensor of unknown channels (computed elsewhere, or a per-channel attribute) broadcasts against ours.
                self._block(left or right, f"{node.kind()} with a tensor of unknown channels")
            self.space_of[node.output()] = left or right

    def _is_scalar_attribute(self, value: torch._C.Value) -> bool:
        name = self.attribute_of.get(value)
        return name is not None and name in self.shapes and self.shapes[name].numel() == 1

    def _cat(self, node: torch._C.Node, inputs: list[torch._C.Value]) -> None:
        dim = inputs[1].toIValue() if inputs[1].node().kind() == "prim::Constant" else None
        list_node = inputs[0].node()
        parts = [self.space_of.get(v) for v in list_node.inputs()] if list_node.kind() == "prim::ListConstruct" else []
        if dim != 1 or not parts or any(p is None for p in parts):
            return self._opaque(node)
        space = self._new()
        space.parts = [p.root() for p in parts]
        self.space_of[node.output()] = space

    def _opaque(self, node: torch._C.Node) -> None:
        """An op we do not model: every space it reads is left whole, its outputs are unknown."""
        reason = f"used by {node.kind()}, which pruning does not model"
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
                self.space_of[value] = self._new(blocked=f"output of {node.kind()}")

    def _block_other_inputs(self, node: torch._C.Node, values: list[torch._C.Value]) -> None:
        for value in values:
            if value in self.space_of:
                self._block_value(value, f"second tensor operand of {node.kind()}")

    # ------------------------------------------------------------------ spaces

    def _new(self, blocked: str | None = None, producer_module: str | None = None) -> ChannelSpace:
        space = ChannelSpace(ident=len(self.spaces), producer_module=producer_module)
        if blocked:
            space.blocked.append(blocked)
        self.spaces.append(space)
        return space

    def _produce(self, module: str, weight: str, bias: str | None) -> ChannelSpace:
        space = self._new(producer_module=module)
        size = self.shapes[weight][0]
        space.members.append(Member(weight, 0, 0, size, producer=True))
        if bias is not None and bias in self.shapes:
            space.members.append(Member(bias, 0, 0, size, producer=True))
        return space

    def _attach(self, space: ChannelSpace, parameter: str | None, dim: int, offset: int = 0,
                length: int | None = None) -> None:
        if parameter is None or parameter not in self.shapes or len(self.shapes[parameter]) <= dim:
            return
        space = space.root()
        if space.parts is None:
            length = self.shapes[parameter][dim] if length is None else length
            space.members.append(Member(parameter, dim, offset, length, producer=False))
            return
        for part in space.parts:
            size = _size(part.root())
            if size is None:
                self._block(space, "a concatenated input of unknown channels")
                return
            self._attach(part, parameter, dim, offset, size)
            offset += size
        if offset != self.shapes[parameter][dim]:
            self._block(space, f"{parameter} does not match the concatenation's channels")

    def _union(self, left: ChannelSpace, right: ChannelSpace) -> ChannelSpace:
        left, right = left.root(), right.root()
        if left is right:
            return left
        if left.parts is not None or right.parts is not None:
            self._block(left, "a concatenation joined by an elementwise op")
            self._block(right, "a concatenation joined by an elementwise op")
        right.parent = left
        left.members.extend(right.members)
        left.blocked.extend(right.blocked)
        right.members, right.blocked = [], []
        return left

    def _block(self, space: ChannelSpace, reason: str) -> None:
        root = space.root()
        if reason not in root.blocked:
            root.blocked.append(reason)
        for part in root.parts or []:
            self._block(part, reason)

    def _block_value(self, value: torch._C.Value, reason: str) -> None:
        space = self.space_of.get(value)
        if space is not None:
            self._block(space, reason)
        elif value.node().kind() == "prim::ListConstruct":
            for item in value.node().inputs():
                self._block_value(item, reason)

    # ------------------------------------------------------------------ result

    def groups(self) -> list[ChannelGroup]:
        found = []
        for space in self.spaces:
            if space.parent is not None or space.parts is not None or not space.members:
                continue
            producers = [m for m in space.members if m.producer]
            if not producers:
                continue
            size = producers[0].length
            blocked = list(space.blocked)
            mismatched = sorted({m.parameter for m in space.members if m.length != size})
            if mismatched:
                blocked.append(f"a reshape fixes the channel count ({', '.join(mismatched)} does not match {size} channels)")
            name = producers[0].parameter.rpartition(".")[0]
            found.append(ChannelGroup(name=name, size=size, members=space.members, blocked=blocked))
        return found


def _size(space: ChannelSpace) -> int | None:
    producers = [m for m in space.members if m.producer]
    return producers[0].length if producers else None


def _nested_nodes(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nested_nodes(inner)
