"""Rewriting the weight constants of a frozen TorchScript graph: int8 linears (``quantized::linear_dynamic``)
in any spelling (``linear_forms``), int8 embedding tables (``embedding``), weights stored small (int8
or float16) and dequantized where they are read, and recurrent layers onto int8 kernels (``recurrent``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from workers.engine.linear_forms import LinearRead, split_uses
from workers.engine.methods.quantize.embedding import EmbeddingRewrites
from workers.engine.methods.quantize.recurrent import RecurrentRewrites

_FLOAT32 = 6  # TorchScript's integer code for torch.float32


class GraphRewriter(RecurrentRewrites, EmbeddingRewrites):
    """Rewrites weight constants of a frozen graph in place."""

    def __init__(self, graph: torch._C.Graph, dtype: str, per_channel: bool) -> None:
        self.graph = graph
        self.dtype = dtype
        self.per_channel = per_channel
        self.last_reason: str | None = None
        self._packed: dict[tuple[int, bool, int | None], torch._C.Value] = {}
        # weight pointer -> one of its packed constants, and whether it was packed transposed ([in, out] weight)
        self._packed_for: dict[int, tuple[torch._C.Value, bool]] = {}

    def rewrite_tensor(self, node: torch._C.Node, weight: torch.Tensor) -> str:
        """Rewrite one weight constant; return ``'dynamic'`` or ``'weight_only'``.

        With at least one linear use (qint8; any spelling, ``linear_forms``), the weight is stored
        once, prepacked ``[out, in]`` (a ``[in, out]`` weight transposed here, once): linears become
        ``quantized::linear_dynamic``; checks of its metadata (dtype, device, ``requires_grad``:
        torch's fast-path conditions) become constants; any other read (a slice for cross-attention,
        a fused op on nested inputs) unpacks and dequantizes it where it is read, so that costs only
        on the branch that runs it.
        """
        uses = list(leaf_uses(node.output()))
        reads, others = split_uses(uses, weight)
        if self.dtype == "qint8" and reads:
            for read in reads:
                self._to_dynamic_linear(read, weight)
            packed, transposed = self._packed_for[weight.data_ptr()]
            float_reads = set()
            for use in others:
                if not self._fold_metadata(use, weight):
                    float_reads.add(use.user.kind())
                    self._read_dequantized(use, packed, transposed)
            self.last_reason = (
                f"int8 kernel for its linear calls; branches that pass it to "
                f"{', '.join(sorted(float_reads))} read it dequantized"
                if float_reads
                else None
            )
            return "dynamic"
        replacement = self._stored_small(node, weight)
        node.output().replaceAllUsesWith(replacement)
        other = sorted({use.user.kind() for use in others})
        if self.dtype == "float16":
            self.last_reason = "float16 weights are stored half size and cast to float32 when read"
        else:
            self.last_reason = f"also read by {', '.join(other)}, which has no int8 kernel here"
        return "weight_only"

    def _fold_metadata(self, use: torch._C.Use, weight: torch.Tensor) -> bool:
        """Replace a read of the weight's metadata by its value; False if ``use`` is not one."""
        user = use.user
        facts = {
            "prim::dtype": weight.dtype,
            "prim::device": weight.device,
            "prim::requires_grad": False,
            "prim::is_nested": False,
            "aten::dim": weight.dim(),
            "aten::is_floating_point": True,
        }
        if user.kind() not in facts or len(list(user.inputs())) != 1 or len(list(user.outputs())) != 1:
            return False
        with self.graph.insert_point_guard(user):
            user.output().replaceAllUsesWith(self.graph.insertConstant(facts[user.kind()]))
        user.destroy()
        return True

    def _read_dequantized(self, use: torch._C.Use, packed: torch._C.Value, transposed: bool) -> None:
        with self.graph.insert_point_guard(use.user):
            unpacked = self.graph.create("quantized::linear_unpack", [packed], 2)
            self.graph.insertNode(unpacked)
            unpacked.outputsAt(0).setType(torch._C.TensorType.get())
            unpacked.outputsAt(1).setType(torch._C.OptionalType(torch._C.TensorType.get()))
            weight = self.graph.insert("aten::dequantize", [unpacked.outputsAt(0)])
            if transposed:  # packed [out, in]; the graph holds it [in, out]
                weight = self.graph.insert("aten::t", [weight])
        use.user.replaceInput(use.offset, weight)

    def rewrite_tensor_list(self, node: torch._C.Node, tensors: list[torch.Tensor], chosen: list[bool]) -> None:
        """Replace a constant list of tensors (an RNN's flat weights) by a list of dequantized ones."""
        values = []
        with self.graph.insert_point_guard(self._after_constants()):
            for tensor, is_chosen in zip(tensors, chosen):
                if is_chosen and tensor.dim() >= 2 and tensor.is_floating_point():
                    values.append(self._stored_small_value(tensor))
                else:
                    values.append(self.graph.insertConstant(tensor))
            new_list = self.graph.create("prim::ListConstruct", values)
            new_list.output().setType(node.output().type())
            self.graph.insertNode(new_list)
        node.output().replaceAllUsesWith(new_list.output())

    def _to_dynamic_linear(self, read: LinearRead, weight: torch.Tensor) -> None:
        bias_value = read.bias.toIValue() if read.bias is not None else None
        key = (weight.data_ptr(), read.transposed, bias_value.data_ptr() if bias_value is not None else None)
        packed = self._packed.get(key)
        if packed is None:
            qweight = self._quantize_int8(weight.t() if read.transposed else weight)
            bias = bias_value.detach().float() if bias_value is not None else None
            with self.graph.insert_point_guard(self.graph.findNode("prim::Constant")):
                packed = self.graph.insertConstant(torch.ops.quantized.linear_prepack(qweight, bias))
            self._packed[key] = packed
            self._packed_for.setdefault(weight.data_ptr(), (packed, read.transposed))
        with self.graph.insert_point_guard(read.output.node()):
            # reduce_range=True: fbgemm's int8 dot products can saturate with full-range activations.
            reduce_range = self.graph.insertConstant(True)
            output = self.graph.insert("quantized::linear_dynamic", [read.input, packed, reduce_range])
        output.setType(read.output.type())
        read.output.replaceAllUsesWith(output)
        for dead in read.dead:
            dead.destroy()

    def _stored_small(self, node: torch._C.Node, weight: torch.Tensor) -> torch._C.Value:
        with self.graph.insert_point_guard(self._after_constants()):
            return self._stored_small_value(weight)

    def _stored_small_value(self, weight: torch.Tensor) -> torch._C.Value:
        if self.dtype == "float16":
            stored = self.graph.insertConstant(weight.detach().half())
            return self.graph.insert("aten::to", [stored, self.graph.insertConstant(_FLOAT32)])
        stored = self.graph.insertConstant(self._quantize_int8(weight))
        return self.graph.insert("aten::dequantize", [stored])

    def _quantize_int8(self, weight: torch.Tensor, per_channel: bool | None = None) -> torch.Tensor:
        weight = weight.detach().float().contiguous()
        if (self.per_channel if per_channel is None else per_channel) and weight.dim() >= 2:
            max_abs = weight.abs().reshape(weight.shape[0], -1).amax(dim=1)
            scales = (max_abs / 127.0).clamp(min=1e-12).double()
            zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
            return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        scale = max(float(weight.abs().max()) / 127.0, 1e-12)
        return torch.quantize_per_tensor(weight, scale, 0, torch.qint8)

    def _after_constants(self) -> torch._C.Node:
        """Insert new values right after the constants at the top of the graph.

        Constants of a frozen graph sit in the top block, so a point just before the
        first non-constant top-level node dominates every use, nested blocks included.
        """
        for candidate in self.graph.nodes():
            if candidate.kind() != "prim::Constant":
                return candidate
        return self.graph.return_node()


def constant_source(value: torch._C.Value) -> torch._C.Node | None:
    """The ``prim::Constant`` a value is, looking through ``prim::unchecked_cast`` (Optional weights)."""
    node = value.node()
    while node.kind() == "prim::unchecked_cast":
        node = node.inputsAt(0).node()
    return node if node.kind() == "prim::Constant" else None


def leaf_uses(value: torch._C.Value) -> Iterator[torch._C.Use]:
    """Uses of a value, with ``prim::unchecked_cast`` nodes looked through."""
    for use in list(value.uses()):
        if use.user.kind() == "prim::unchecked_cast":
            yield from leaf_uses(use.user.output())
        else:
            yield use
