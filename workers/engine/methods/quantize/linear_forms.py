"""Linear layers in every spelling a TorchScript graph gives them, read off the uses of a weight constant.

``nn.Linear`` and ``F.linear`` are ``aten::linear(x, W, b)`` with ``W`` ``[out, in]``. Other code
writes the same computation with the weight the other way round: ``transformers``' ``Conv1D``
(GPT-2) is ``addmm(b, x, W)`` with ``W`` ``[in, out]``, hand-written layers are ``x @ W (+ b)``
(``aten::matmul`` / ``aten::mm``, then ``aten::add``), or ``x @ W.t()``. Each is
``x @ M^T + b`` for one ``[out, in]`` matrix ``M`` (the constant, or its transpose): what
``quantized::linear_dynamic`` computes once ``M`` is prepacked in int8.
"""
from __future__ import annotations

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


def split_uses(uses: list[torch._C.Use], weight: torch.Tensor) -> tuple[list[LinearRead], list[torch._C.Use]]:
    """The uses of a weight constant that are linear layers, and the others (read as the weight itself)."""
    reads: list[LinearRead] = []
    others: list[torch._C.Use] = []
    for use in uses:
        read = _linear_read(use, weight, transposed_view=False)
        if read is not None:
            reads.append(read)
            continue
        if use.user.kind() in _TRANSPOSES and weight.dim() == 2 and _is_transpose(use.user):
            inner = [_linear_read(inner, weight, transposed_view=True) for inner in use.user.output().uses()]
            if inner and all(read is not None for read in inner):
                reads.extend(inner)  # the transpose dies with its last product
                continue
        others.append(use)
    return reads, others


def is_matmul_weight(use: torch._C.Use) -> bool:
    """Whether a use reads a weight as the matrix of a product (any spelling, transposed or not)."""
    user = use.user
    if user.kind() in _TRANSPOSES and use.offset == 0:
        return any(is_matmul_weight(inner) for inner in user.output().uses())
    return (user.kind(), use.offset) in MATMUL_WEIGHT_USES


def _linear_read(use: torch._C.Use, weight: torch.Tensor, transposed_view: bool) -> LinearRead | None:
    """``use`` as a linear layer, or None. ``transposed_view``: the value used is the constant's transpose."""
    user, kind = use.user, use.user.kind()
    if weight.dim() != 2 or not weight.is_floating_point():
        return None
    if kind == "aten::linear" and use.offset == 1:  # x @ value^T + b
        bias = user.inputsAt(2)
        if not _constant_or_none(bias, weight.shape[1] if transposed_view else weight.shape[0]):
            return None
        return LinearRead(user, user.inputsAt(0), transposed_view, _tensor_or_none(bias), user.output(), [user])
    out = weight.shape[0] if transposed_view else weight.shape[1]  # x @ value: the value is [in, out]
    if kind in ("aten::matmul", "aten::mm") and use.offset == 1 and _rank(user.inputsAt(0)) != 1:
        read = LinearRead(user, user.inputsAt(0), not transposed_view, None, user.output(), [user])
        return _with_bias_added(read, out)
    if kind == "aten::addmm" and use.offset == 2 and _is_one(user.inputsAt(3)) and _is_one(user.inputsAt(4)):
        bias = user.inputsAt(0)
        if not _constant_or_none(bias, out) or _tensor_or_none(bias) is None:
            return None
        return LinearRead(user, user.inputsAt(1), not transposed_view, bias, user.output(), [user])
    return None


def _with_bias_added(read: LinearRead, out: int) -> LinearRead:
    """Fold a following ``+ b`` (``aten::add`` of a constant ``[out]`` vector, alpha 1) into the read."""
    uses = list(read.output.uses())
    if len(uses) != 1 or uses[0].user.kind() != "aten::add" or len(list(uses[0].user.inputs())) != 3:
        return read
    add = uses[0].user
    other = add.inputsAt(1 - uses[0].offset) if uses[0].offset in (0, 1) else None
    if other is None or not _is_one(add.inputsAt(2)) or _tensor_or_none(other) is None or not _constant_or_none(other, out):
        return read
    return LinearRead(read.node, read.input, read.transposed, other, add.output(), [add, *read.dead])


def _is_transpose(node: torch._C.Node) -> bool:
    kind = node.kind()
    if kind in ("aten::t", "aten::numpy_T"):
        return True
    arguments = [value.toIValue() if value.node().kind() == "prim::Constant" else None for value in node.inputs()][1:]
    if kind == "aten::transpose":
        return len(arguments) == 2 and None not in arguments and {a % 2 for a in arguments} == {0, 1}
    return kind == "aten::permute" and arguments and arguments[0] is not None and [a % 2 for a in arguments[0]] == [1, 0]


def _constant_or_none(value: torch._C.Value, size: int) -> bool:
    """A bias the int8 kernel can carry: None, or a constant float vector of ``size``."""
    node = value.node()
    while node.kind() == "prim::unchecked_cast":
        node = node.inputsAt(0).node()
    if node.kind() != "prim::Constant":
        return False
    tensor = node.output().toIValue()
    return tensor is None or (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                              and tuple(tensor.shape) == (size,))


def _tensor_or_none(value: torch._C.Value) -> torch._C.Value | None:
    node = value.node()
    while node.kind() == "prim::unchecked_cast":
        node = node.inputsAt(0).node()
    return node.output() if node.kind() == "prim::Constant" and isinstance(node.output().toIValue(), torch.Tensor) \
        else None


def _is_one(value: torch._C.Value) -> bool:
    return value.node().kind() == "prim::Constant" and value.toIValue() == 1


def _rank(value: torch._C.Value) -> int | None:
    kind = value.type()
    return kind.dim() if isinstance(kind, torch._C.TensorType) else None
