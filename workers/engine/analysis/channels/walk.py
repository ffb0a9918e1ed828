"""The walk over a canonical TorchScript graph that gives each value its channel axis."""

from __future__ import annotations

import dataclasses

import torch

from workers.engine.analysis.channels.attention import Attention
from workers.engine.analysis.channels.joins import Joins
from workers.engine.analysis.channels.layers import Layers
from workers.engine.analysis.channels.ops import (
    CHANNEL_PRESERVING,
    CONVOLUTIONS,
    ELEMENTWISE_BINARY,
    LINEAR_PRODUCTS,
    REDUCTIONS,
    RESHAPES,
    SHAPE_QUERIES,
)
from workers.engine.analysis.channels.reshapes import Reshapes
from workers.engine.analysis.channels.spaces import Axis, ChannelSpace, Spaces
from workers.engine.analysis.channels.values import Values, constant


class ChannelAnalysis(Layers, Attention, Reshapes, Joins, Values, Spaces):
    """One analysis of one graph: ``run`` walks it, ``groups`` reads the channel groups out.

    The handlers of each kind of op live in the mixins (``layers``, ``attention``, ``reshapes``, ``joins``); the
    per-value state in ``values``, the channel spaces in ``spaces``."""

    def __init__(
        self,
        shapes: dict[str, torch.Size],
        values: dict[torch._C.Value, tuple[int, ...]],
        layer_norms: list[torch._C.Node],
    ) -> None:
        self.shapes = shapes
        self.values = values
        self.layer_norm_index = {node: index for index, node in enumerate(layer_norms)}
        self.spaces: list[ChannelSpace] = []
        self.axis_of: dict[torch._C.Value, Axis] = {}
        self.attribute_of: dict[torch._C.Value, str] = {}
        self.items_of: dict[torch._C.Value, list[torch._C.Value]] = {}  # lists and tuples

    def run(self, graph: torch._C.Graph) -> None:
        inputs = list(graph.inputs())
        self.attribute_of[inputs[0]] = ""  # self
        for value in inputs[1:]:
            if value.type().kind() == "TensorType":
                self.axis_of[value] = Axis(self._new(blocked="model input (its channels are fixed)"), dim=-1)
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
        if kind == "prim::Constant" or kind in SHAPE_QUERIES:
            return
        if kind in CONVOLUTIONS:
            return self._conv(node, inputs)
        if kind in LINEAR_PRODUCTS:
            return self._linear(node, inputs)
        if kind == "aten::scaled_dot_product_attention":
            return self._attention(node, inputs)
        if kind in ("aten::batch_norm", "aten::instance_norm"):
            return self._norm(node, inputs, inputs[1:5], dim=1)
        if kind == "aten::layer_norm":
            return self._layer_norm(node, inputs)
        if kind == "aten::group_norm":
            return self._opaque(node, "group_norm (num_groups is compiled into the model)")
        if kind == "aten::embedding":
            return self._embedding(node, inputs)
        if kind in CHANNEL_PRESERVING:
            return self._preserve(node, inputs)
        if kind in ("aten::softmax", "aten::log_softmax"):
            return self._along(node, inputs, reduces=False)
        if kind in RESHAPES:
            return self._reshape(node, inputs)
        if kind == "aten::expand":
            return self._expand(node, inputs)
        if kind in ("aten::transpose", "aten::permute"):
            return self._move(node, inputs)
        if kind in REDUCTIONS:
            return self._reduce(node, inputs)
        if kind in ("aten::select", "aten::slice"):
            return self._along(node, inputs, reduces=kind == "aten::select")
        if kind in ELEMENTWISE_BINARY:
            return self._binary(node, inputs)
        if kind == "aten::cat":
            return self._cat(node, inputs)
        if kind in ("aten::split", "aten::chunk", "aten::unsafe_split", "aten::unsafe_chunk", "aten::split_with_sizes"):
            return self._split(node, inputs)
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
            index = constant(inputs[1])
            items = self.items_of[inputs[0]]
            if isinstance(index, int) and -len(items) <= index < len(items):
                return self._alias(node.output(), items[index])
        if kind == "prim::If":
            return self._branch(node)
        self._opaque(node)

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
                self._set(value, Axis(self._new(blocked="a branch output of unknown channels"), dim=-1))
                continue
            space = axes[0].space
            for other in axes[1:]:
                if dataclasses.replace(other, space=space) != dataclasses.replace(axes[0], space=space):
                    self._block(space, "the arms of a branch put channels in different places")
                space = self._union(space, other.space)
            self._set(value, dataclasses.replace(axes[0], space=space))
