"""Each graph value's channel axis, and how an op the analysis does not model blocks what it reads
(part of ``walk.ChannelAnalysis``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from workers.engine.analysis.channels.ops import SHAPE_QUERIES
from workers.engine.analysis.channels.spaces import Axis


class Values:
    """Per-value state: the axis of a tensor, the items of a list or tuple, the attribute a value reads."""

    values: dict
    axis_of: dict
    items_of: dict

    def _alias(self, value: torch._C.Value, item: torch._C.Value) -> None:
        if item in self.axis_of:
            self.axis_of[value] = self.axis_of[item]
        if item in self.items_of:
            self.items_of[value] = self.items_of[item]

    def _dim(self, value: torch._C.Value, axis: Axis) -> int | None:
        """The channel dimension of ``value``, counted from the front (None if the rank is unknown, or 0:
        a scalar tensor such as a traced ``NumToTensor`` of a size has no channel dimension)."""
        shape = self.values.get(value)
        if axis.dim >= 0:
            return axis.dim
        return axis.dim % len(shape) if shape else None

    def _input_axis(self, value: torch._C.Value, consumer: str, dim: int) -> Axis | None:
        """The axis of a layer's input, if its channels are where the layer reads them (dim 1, or last for -1)."""
        axis = self.axis_of.get(value)
        if axis is None:
            return None
        if axis.head_width:
            self._block(axis.space, f"{consumer} reads attention heads that were not merged back")
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

    def _relocated(self, axis: Axis, where: Callable[[int], int | None], dim: int) -> Axis:
        """``axis`` after an op that moves or drops dimensions: ``where`` maps an input dimension to the
        output's (None: gone; only a head's ``inner`` may go); ``dim`` is the axis's own, from the front."""
        inner = None if axis.inner is None else where(axis.inner)
        return dataclasses.replace(axis, dim=where(dim), inner=inner)

    def _set(self, value: torch._C.Value, axis: Axis) -> None:
        shape = self.values.get(value)
        dim = self._dim(value, axis)
        if shape is not None and dim is not None and axis.dim >= 0 and dim >= len(shape):
            self._block(axis.space, "the channel dimension was lost")
        self.axis_of[value] = axis

    def _block_value(self, value: torch._C.Value, reason: str, seen: set | None = None) -> None:
        axis = self.axis_of.get(value)
        if axis is not None:
            self._block(axis.space, reason)
        seen = set() if seen is None else seen
        if value in self.items_of and id(self.items_of[value]) not in seen:
            seen.add(id(self.items_of[value]))
            for item in self.items_of[value]:
                self._block_value(item, reason, seen)

    def _opaque(self, node: torch._C.Node, why: str | None = None) -> None:
        """An op we do not model: every space it reads is left whole, its outputs are unknown."""
        reason = f"used by {why or node.kind() + ', which pruning does not model'}"
        for value in node.inputs():
            self._block_value(value, reason)
        for block in node.blocks():
            for inner in nested_nodes(block):
                if inner.kind() in SHAPE_QUERIES:
                    continue
                for value in inner.inputs():
                    self._block_value(value, f"used inside {node.kind()}")
        for value in node.outputs():
            if value.type().kind() == "TensorType":
                self.axis_of[value] = Axis(self._new(blocked=f"output of {node.kind()}"), dim=-1)


def constant(value: torch._C.Value) -> object:
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        items = [constant(v) for v in node.inputs()]
        return None if any(i is None for i in items) else items
    return None


def nested_nodes(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from nested_nodes(inner)
