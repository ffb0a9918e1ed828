"""Linear layers in every spelling a TorchScript graph gives them, read off the uses of a weight constant.

``nn.Linear`` and ``F.linear`` are ``aten::linear(x, W, b)`` with ``W`` ``[out, in]``. Other code
writes the same computation with the weight the other way round: ``transformers``' ``Conv1D``
(GPT-2) is ``addmm(b, x, W)`` with ``W`` ``[in, out]``, hand-written layers are ``x @ W (+ b)``
(``aten::matmul`` / ``aten::mm``, then ``aten::add``), or ``x @ W.t()``. Each is
``x @ M^T + b`` for one ``[out, in]`` matrix ``M`` (the constant, or its transpose): what
``quantized::linear_dynamic`` computes once ``M`` is prepacked in int8.

One definition serves every method: quantization reads a frozen graph, whose weights and biases
are constants (the default ``shape_of``); the channel analysis of structured pruning reads the
canonical graph, whose weights are parameters (``linear_read`` with a ``shape_of`` that looks the
attribute up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Reads of a 2-D weight that are its transpose: (op, the constant arguments that make it one).
_TRANSPOSES = {"aten::t", "aten::numpy_T", "aten::transpose", "aten::permute"}
# Ops that read a weight as the right-hand matrix of a product (for the layer's type, even when
# no int8 kernel fits: ``bmm`` over a 3-D constant is a batch of different weights).
MATMUL_WEIGHT_USES = {("aten::linear", 1), ("aten::matmul", 1), ("aten::mm", 1), ("aten::addmm", 2), ("aten::bmm", 1)}


@dataclass
class LinearRead:
    """One use of a weight constant that computes ``input @ M^T + bias``."""

    node: torch._C.Node  # the product (linear, matmul, mm, addmm)
    input: torch._C.Value
    transposed: bool  # the constant is ``[in, out]``: M is its transpose
    bias: torch._C.Value | None  # a constant bias (a folded ``+ b``, addmm's or linear's), or None
    output: torch._C.Value  # what the int8 linear's result replaces
    dead: list[torch._C.Node] = field(default_factory=list)  # nodes left without use, last first


# The shape of a tensor a layer owns (a constant, a parameter), or None for anything else (an activation).
ShapeOf = Callable[[torch._C.Value], "tuple[int, ...] | None"]
# Where each product reads its weight: (op, argument index).
_WEIGHT_ARGUMENT = {"aten::linear": 1, "aten::matmul": 1, "aten::mm": 1, "aten::addmm": 2}


def split_uses(uses: list[torch._C.Use], weight: torch.Tensor) -> tuple[list[LinearRead], list[torch._C.Use]]:
    """The uses of a weight constant that are linear layers, and the others (read as the weight itself)."""
    reads: list[LinearRead] = []
    others: list[torch._C.Use] = []
    if not weight.is_floating_point():
        return reads, list(uses)
    shape = tuple(weight.shape)
    for use in uses:
        read = _linear_read(use.user, use.offset, shape, False, constant_shape)
        if read is not None:
            reads.append(read)
            continue
        if use.user.kind() in _TRANSPOSES and len(shape) == 2 and _is_transpose(use.user):
            inner = [
                _linear_read(inner.user, inner.offset, shape, True, constant_shape)
                for inner in use.user.output().uses()
            ]
            if inner and all(read is not None for read in inner):
                reads.extend(inner)  # the transpose dies with its last product
                continue
        others.append(use)
    return reads, others


def linear_read(node: torch._C.Node, shape_of: ShapeOf) -> tuple[torch._C.Value, LinearRead] | None:
    """``node`` (a linear, matmul, mm or addmm) as a linear layer whose weight ``shape_of`` knows, read
    directly or through a transpose: the weight value and the read; None for a product of two activations."""
    offset = _WEIGHT_ARGUMENT.get(node.kind())
    if offset is None or offset >= len(list(node.inputs())):
        return None
    weight = node.inputsAt(offset)
    shape = shape_of(weight)
    if shape is not None:
        read = _linear_read(node, offset, shape, False, shape_of)
        return (weight, read) if read is not None else None
    view = weight.node()
    if (
        view.kind() in _TRANSPOSES
        and _is_transpose(view)
        and (shape := shape_of(view.inputsAt(0))) is not None
        and len(shape) == 2
    ):
        read = _linear_read(node, offset, shape, True, shape_of)
        return (view.inputsAt(0), read) if read is not None else None
    return None


def constant_shape(value: torch._C.Value) -> tuple[int, ...] | None:
    """The shape of a tensor constant (looked through ``prim::unchecked_cast``), else None."""
    owned = _owned(value, lambda v: None)
    return None if owned is None else tuple(owned.toIValue().shape)


def is_matmul_weight(use: torch._C.Use) -> bool:
    """Whether a use reads a weight as the matrix of a product (any spelling, transposed or not)."""
    user = use.user
    if user.kind() in _TRANSPOSES and use.offset == 0:
        return any(is_matmul_weight(inner) for inner in user.output().uses())
    return (user.kind(), use.offset) in MATMUL_WEIGHT_USES


def _linear_read(
    user: torch._C.Node, offset: int, shape: tuple[int, ...], transposed_view: bool, shape_of: ShapeOf
) -> LinearRead | None:
    """Argument ``offset`` of ``user`` as the weight of a linear layer, or None. ``shape``: the owned
    tensor's; ``transposed_view``: the value used is that tensor's transpose."""
    kind = user.kind()
    if len(shape) != 2:
        return None
    if kind == "aten::linear" and offset == 1:  # x @ value^T + b
        bias = user.inputsAt(2)
        if not _owned_vector_or_none(bias, shape[1] if transposed_view else shape[0], shape_of):
            return None
        return LinearRead(user, user.inputsAt(0), transposed_view, _owned(bias, shape_of), user.output(), [user])
    out = shape[0] if transposed_view else shape[1]  # x @ value: the value is [in, out]
    if kind in ("aten::matmul", "aten::mm") and offset == 1 and _rank(user.inputsAt(0)) != 1:
        read = LinearRead(user, user.inputsAt(0), not transposed_view, None, user.output(), [user])
        return _with_bias_added(read, out, shape_of)
    if kind == "aten::addmm" and offset == 2 and _is_one(user.inputsAt(3)) and _is_one(user.inputsAt(4)):
        bias = user.inputsAt(0)
        if not _owned_vector_or_none(bias, out, shape_of) or _owned(bias, shape_of) is None:
            return None
        return LinearRead(user, user.inputsAt(1), not transposed_view, _owned(bias, shape_of), user.output(), [user])
    return None


def _with_bias_added(read: LinearRead, out: int, shape_of: ShapeOf) -> LinearRead:
    """Fold a following ``+ b`` (``aten::add`` of an owned ``[out]`` vector, alpha 1) into the read."""
    uses = list(read.output.uses())
    if len(uses) != 1 or uses[0].user.kind() != "aten::add" or len(list(uses[0].user.inputs())) != 3:
        return read
    add = uses[0].user
    other = add.inputsAt(1 - uses[0].offset) if uses[0].offset in (0, 1) else None
    if (
        other is None
        or not _is_one(add.inputsAt(2))
        or _owned(other, shape_of) is None
        or not _owned_vector_or_none(other, out, shape_of)
    ):
        return read
    return LinearRead(read.node, read.input, read.transposed, _owned(other, shape_of), add.output(), [add, *read.dead])


def _is_transpose(node: torch._C.Node) -> bool:
    kind = node.kind()
    if kind in ("aten::t", "aten::numpy_T"):
        return True
    arguments = [value.toIValue() if value.node().kind() == "prim::Constant" else None for value in node.inputs()][1:]
    if kind == "aten::transpose":
        return len(arguments) == 2 and None not in arguments and {a % 2 for a in arguments} == {0, 1}
    return (
        kind == "aten::permute" and arguments and arguments[0] is not None and [a % 2 for a in arguments[0]] == [1, 0]
    )


def _owned_vector_or_none(value: torch._C.Value, size: int, shape_of: ShapeOf) -> bool:
    """A bias the layer can carry: None, or an owned float vector of ``size``."""
    node = _unchecked(value).node()
    if node.kind() == "prim::Constant":
        tensor = node.output().toIValue()
        if tensor is None:
            return True
        return isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tuple(tensor.shape) == (size,)
    return shape_of(value) == (size,)


def _owned(value: torch._C.Value, shape_of: ShapeOf) -> torch._C.Value | None:
    """The tensor a layer owns behind ``value`` (a tensor constant, or what ``shape_of`` knows), or None."""
    inner = _unchecked(value)
    if inner.node().kind() == "prim::Constant":
        return inner if isinstance(inner.toIValue(), torch.Tensor) else None
    return value if shape_of(value) is not None else None


def _unchecked(value: torch._C.Value) -> torch._C.Value:
    while value.node().kind() == "prim::unchecked_cast":
        value = value.node().inputsAt(0)
    return value


def _is_one(value: torch._C.Value) -> bool:
    return value.node().kind() == "prim::Constant" and value.toIValue() == 1


def _rank(value: torch._C.Value) -> int | None:
    kind = value.type()
    return kind.dim() if isinstance(kind, torch._C.TensorType) else None
