"""Dynamic quantization of a TorchScript model, done on its frozen graph.

Why a graph rewrite and not torch's own passes (facts measured on torch 2.14.1):
- eager ``quantize_dynamic`` returns a ScriptModule unchanged;
- graph-mode ``quantize_dynamic_jit`` segfaults on a scripted ``nn.TransformerEncoder``
  and refuses to exclude one of several submodules of the same compiled type.

So the model is frozen (weights become graph constants) and each selected weight
constant is rewritten in one of two ways:
- *dynamic*: its ``aten::linear`` uses -> ``quantized::linear_dynamic`` with a prepacked
  int8 weight (int8 matmul, activations quantized per batch at run time); other reads of
  the same weight unpack it where they happen (one stored copy). Fused attention ops
  (``attention.py``) are first spelled out as linear calls so their projections qualify;
  an LSTM/GRU's flat weight list becomes ``aten::quantized_lstm``/``quantized_gru`` cells;
- *weight-only*: no linear use at all (or float16) -> the constant is stored as int8
  (or float16) and dequantized where it is read: the file shrinks as much, the compute
  stays float.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from modelpress.spec import DYNAMIC_MODULES

from workers.engine.methods.quantize.attention import expand_fused_attention
from workers.engine.errors import UnsupportedModel
from workers.engine.methods.quantize.static import quantize_static
from workers.engine.analysis.torchscript_graph import (
    ParameterOwner,
    fold_tensor_attributes,
    freeze_forward,
    matching_pattern,
    parameter_owners,
    quiet_torchscript_warnings,
    tensor_constants,
    tensor_list_constants,
)

Progress = Callable[[str, float], None]

# Module types a user can select, and the class names that count as each.
MODULE_TYPE_ALIASES: dict[str, frozenset[str]] = {
    "Linear": frozenset({"Linear", "NonDynamicallyQuantizableLinear", "LazyLinear"}),
    "LSTM": frozenset({"LSTM"}),
    "GRU": frozenset({"GRU"}),
    "RNN": frozenset({"RNN"}),
    "MultiheadAttention": frozenset({"MultiheadAttention"}),
}

_FLOAT32 = 6  # TorchScript's integer code for torch.float32
_RNN_KERNELS = {"aten::lstm": "aten::quantized_lstm", "aten::gru": "aten::quantized_gru"}


def quantize(
    model: torch.jit.ScriptModule,
    spec: Mapping[str, Any],
    data: object | None = None,
    progress: Progress | None = None,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Quantize the weights of the selected module types; return the model and what was done.

    ``w_q = round(w / s_c)`` with one symmetric scale ``s_c = max|w_c| / 127`` per output
    channel (or per tensor), int8; float16 casts the weights instead.
    """
    progress = progress or (lambda stage, fraction: None)
    if spec.get("mode", "dynamic") == "static":
        if data is None:
            raise UnsupportedModel("static quantization needs example inputs to calibrate on")
        return quantize_static(model, spec, data, progress)
    if spec.get("mode", "dynamic") != "dynamic":
        raise UnsupportedModel(f"quantization mode {spec.get('mode')!r} is not available")
    dtype = spec.get("dtype", "qint8")
    selected = _selected_class_names(spec.get("modules", list(DYNAMIC_MODULES)))
    exclude = list(spec.get("exclude", []))
    per_channel = bool(spec.get("per_channel", True))

    progress("freezing", 0.05)
    owners = parameter_owners(model)
    plan = _Plan()
    for owner in owners.values():
        plan.classify(owner, selected, exclude)
    if not plan.targets:
        details = plan.details(dtype, frozen=False)
        details["notes"] = ["no weight matched the selected module types, so the model is returned unchanged"]
        return model, details

    frozen = freeze_forward(model)
    graph = frozen.graph
    rewriter = _GraphRewriter(graph, dtype=dtype, per_channel=per_channel)
    with quiet_torchscript_warnings():
        fold_tensor_attributes(frozen)
        if dtype == "qint8":
            chosen = {tensor.data_ptr() for tensor in model.parameters()
                      if (owner := owners.get(tensor.data_ptr())) is not None and owner.name in plan.targets}
            expanded = expand_fused_attention(graph, lambda value: _constant_pointer(value) in chosen)
            plan.expanded = len(expanded)
        constants = [(node, tensor) for node, tensor in tensor_constants(graph)]
        for index, (node, tensor) in enumerate(constants):
            owner = owners.get(tensor.data_ptr())
            if owner is not None and owner.name in plan.targets:
                kernel = rewriter.rewrite_tensor(node, tensor)
                plan.record(owner, kernel, rewriter.last_reason)
            progress("quantizing", 0.1 + 0.8 * (index + 1) / max(len(constants), 1))
        for node, tensors in tensor_list_constants(graph):
            names = [owners.get(t.data_ptr()) for t in tensors]
            if any(owner is not None and owner.name in plan.targets for owner in names):
                chosen = [owner is not None and owner.name in plan.targets for owner in names]
                reason = _reason_for_list(node)
                every_weight = all(was_chosen for was_chosen, t in zip(chosen, tensors) if t.dim() >= 2)
                if every_weight and rewriter.rewrite_rnn(node, tensors):
                    kernel, reason = "dynamic", None
                    plan.recurrent += 1
                else:
                    rewriter.rewrite_tensor_list(node, tensors, chosen)
                    kernel = "weight_only"
                for owner, was_chosen in zip(names, chosen):
                    if owner is not None and was_chosen:
                        plan.record(owner, kernel, reason)
        torch._C._jit_pass_dce(graph)
        torch._C._jit_pass_lint(graph)
    plan.match_pooled(dict(model.named_parameters()))
    progress("quantized", 0.9)
    return frozen, plan.details(dtype, frozen=True)


# --------------------------------------------------------------------------- planning


@dataclass
class _ModuleRecord:
    module: str
    module_type: str
    tensors: list[str] = field(default_factory=list)
    kernel: str | None = None
    reason: str | None = None


class _Plan:
    """Which parameters to quantize, and afterwards what happened to each module."""

    def __init__(self) -> None:
        self.targets: dict[str, ParameterOwner] = {}
        self.reached: set[str] = set()
        self.done: dict[str, _ModuleRecord] = {}
        self.kept: dict[str, _ModuleRecord] = {}
        self.expanded = 0  # fused attention ops spelled out as linear calls
        self.recurrent = 0  # LSTM/GRU weight lists given the quantized recurrent kernels

    def classify(self, owner: ParameterOwner, selected: set[str], exclude: list[str]) -> None:
        if owner.module_type not in selected:
            return self._keep(owner, f"type {owner.module_type or 'unknown'} not selected")
        pattern = matching_pattern(owner.module, exclude)
        if pattern is not None:
            return self._keep(owner, f"excluded by pattern {pattern!r}")
        if "weight" in owner.name.rpartition(".")[2]:
            self.targets[owner.name] = owner

    def record(self, owner: ParameterOwner, kernel: str, reason: str | None) -> None:
        entry = self.done.setdefault(owner.module, _ModuleRecord(owner.module, owner.module_type))
        entry.tensors.append(owner.name.rpartition(".")[2])
        # A module whose weights took different paths reports the weaker one.
        if entry.kernel != "weight_only":
            entry.kernel, entry.reason = kernel, reason
        self.reached.add(owner.name)

    def match_pooled(self, parameters: dict[str, torch.Tensor]) -> None:
        """Account for targets that never showed up as constants of their own.

        Freezing pools identical constants (clones of one layer, as nn.TransformerEncoder
        makes them, start out equal), so such a weight shares its twin's rewrite.
        """
        for name, owner in self.targets.items():
            if name in self.reached:
                continue
            twin = next(
                (other for other in sorted(self.reached)
                 if parameters[other].shape == parameters[name].shape and torch.equal(parameters[other], parameters[name])),
                None,
            )
            if twin is None:
                self._keep(owner, "not a constant of the frozen forward graph (unused, or reassigned at run time)")
            else:
                twin_module = self.targets[twin].module
                self.record(owner, self.done[twin_module].kernel or "weight_only", f"identical to {twin}, stored once")

    def details(self, dtype: str, frozen: bool) -> dict[str, Any]:
        quantized = [
            {"module": r.module, "type": r.module_type, "tensors": r.tensors, "kernel": r.kernel,
             **({"why": r.reason} if r.reason else {})}
            for r in sorted(self.done.values(), key=lambda r: r.module)
        ]
        kept = [
            {"module": r.module or "(root)", "type": r.module_type, "tensors": r.tensors, "reason": r.reason}
            for r in sorted(self.kept.values(), key=lambda r: r.module)
        ]
        notes = ["biases and normalisation parameters stay float32"]
        if frozen:
            notes.append(
                "the model was frozen: only forward() is kept, attributes became constants, "
                "and training-only code paths were dropped"
            )
        if self.expanded:
            notes.append(
                f"{self.expanded} fused attention op(s) (torch's inference fast path) were rewritten as the same "
                "computation with separate linear projections, so those run int8"
            )
        if self.recurrent:
            notes.append("LSTM/GRU cells use per-tensor int8 weights whatever per_channel says, as eager "
                         "quantize_dynamic does: on their small per-step matrices it is the faster kernel")
        if any(r["kernel"] == "weight_only" for r in quantized):
            notes.append(
                "weight-only modules store int8/float16 weights and dequantize them when read: "
                "a size win, computed in float"
            )
        return {
            "dtype": dtype,
            "quantized_modules": quantized,
            "kept_float": kept,
            "counts": {
                "dynamic": sum(r["kernel"] == "dynamic" for r in quantized),
                "weight_only": sum(r["kernel"] == "weight_only" for r in quantized),
                "kept_float": len(kept),
            },
            "notes": notes,
        }

    def _keep(self, owner: ParameterOwner, reason: str) -> None:
        entry = self.kept.setdefault(owner.module, _ModuleRecord(owner.module, owner.module_type, reason=reason))
        entry.tensors.append(owner.name.rpartition(".")[2])


def _selected_class_names(modules: list[str]) -> set[str]:
    names: set[str] = set()
    for module in modules:
        names |= MODULE_TYPE_ALIASES.get(module, frozenset({module}))
    return names


def _constant_source(value: torch._C.Value) -> torch._C.Node | None:
    """The ``prim::Constant`` a value is, looking through ``prim::unchecked_cast`` (Optional weights)."""
    node = value.node()
    while node.kind() == "prim::unchecked_cast":
        node = node.inputsAt(0).node()
    return node if node.kind() == "prim::Constant" else None


def _constant_pointer(value: torch._C.Value) -> int | None:
    """Storage pointer of the tensor constant behind ``value``, if it is one."""
    node = _constant_source(value)
    tensor = node.output().toIValue() if node is not None else None
    return tensor.data_ptr() if isinstance(tensor, torch.Tensor) else None


def _leaf_uses(value: torch._C.Value) -> Iterator[torch._C.Use]:
    """Uses of a value, with ``prim::unchecked_cast`` nodes looked through."""
    for use in list(value.uses()):
        if use.user.kind() == "prim::unchecked_cast":
            yield from _leaf_uses(use.user.output())
        else:
            yield use


def _reason_for_list(node: torch._C.Node) -> str:
    users = sorted({use.user.kind() for use in node.output().uses()})
    return f"read by {', '.join(users)}, which has no int8 kernel here"


# --------------------------------------------------------------------------- rewriting


class _GraphRewriter:
    """Rewrites weight constants of a frozen graph in place."""

    def __init__(self, graph: torch._C.Graph, dtype: str, per_channel: bool) -> None:
        self.graph = graph
        self.dtype = dtype
        self.per_channel = per_channel
        self.last_reason: str | None = None
        self._packed: dict[tuple[int, int | None], torch._C.Value] = {}
        self._packed_for: dict[int, torch._C.Value] = {}  # weight pointer -> one of its packed constants

    def rewrite_tensor(self, node: torch._C.Node, weight: torch.Tensor) -> str:
        """Rewrite one weight constant; return ``'dynamic'`` or ``'weight_only'``.

        With at least one ``aten::linear`` use (qint8), the weight is stored once, prepacked:
        linears become ``quantized::linear_dynamic``; checks of its metadata (dtype, device,
        ``requires_grad``: torch's fast-path conditions) become constants; any other read (a
        slice for cross-attention, a fused op on nested inputs) unpacks and dequantizes it
        where it is read, so that costs only on the branch that runs it.
        """
        uses = list(_leaf_uses(node.output()))
        linears = [use.user for use in uses if self._is_linear_weight(use)]
        if self.dtype == "qint8" and linears:
            others = [use for use in uses if not self._is_linear_weight(use)]  # before the linears are replaced
            for linear in linears:
                self._to_dynamic_linear(linear, weight)
            packed = self._packed_for[weight.data_ptr()]
            float_reads = set()
            for use in others:
                if not self._fold_metadata(use, weight):
                    float_reads.add(use.user.kind())
                    self._read_dequantized(use, packed)
            self.last_reason = (f"int8 kernel for its linear calls; branches that pass it to "
                                f"{', '.join(sorted(float_reads))} read it dequantized" if float_reads else None)
            return "dynamic"
        replacement = self._stored_small(node, weight)
        node.output().replaceAllUsesWith(replacement)
        other = sorted({use.user.kind() for use in uses if not self._is_linear_weight(use)})
        if self.dtype == "float16":
            self.last_reason = "float16 weights are stored half size and cast to float32 when read"
        else:
            self.last_reason = f"also read by {', '.join(other)}, which has no int8 kernel here"
        return "weight_only"

    def _fold_metadata(self, use: torch._C.Use, weight: torch.Tensor) -> bool:
        """Replace a read of the weight's metadata by its value; False if ``use`` is not one."""
        user = use.user
        facts = {"prim::dtype": weight.dtype, "prim::device": weight.device, "prim::requires_grad": False,
                 "prim::is_nested": False, "aten::dim": weight.dim(), "aten::is_floating_point": True}
        if user.kind() not in facts or len(list(user.inputs())) != 1 or len(list(user.outputs())) != 1:
            return False
        with self.graph.insert_point_guard(user):
            user.output().replaceAllUsesWith(self.graph.insertConstant(facts[user.kind()]))
        user.destroy()
        return True

    def _read_dequantized(self, use: torch._C.Use, packed: torch._C.Value) -> None:
        with self.graph.insert_point_guard(use.user):
            unpacked = self.graph.create("quantized::linear_unpack", [packed], 2)
            self.graph.insertNode(unpacked)
            unpacked.outputsAt(0).setType(torch._C.TensorType.get())
            unpacked.outputsAt(1).setType(torch._C.OptionalType(torch._C.TensorType.get()))
            weight = self.graph.insert("aten::dequantize", [unpacked.outputsAt(0)])
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

    def rewrite_rnn(self, node: torch._C.Node, tensors: list[torch.Tensor]) -> bool:
        """Swap ``aten::lstm`` / ``aten::gru`` reading this flat weight list for the int8 kernels.

        The replacement is what eager ``quantize_dynamic`` runs: ``aten::quantized_lstm`` /
        ``aten::quantized_gru`` over one ``CellParamsBase`` per layer and direction, built by
        ``quantized::make_quantized_cell_params_dynamic`` from prepacked int8 ``w_ih``/``w_hh``.
        Returns False (nothing changed) for what it does not cover: float16, projections
        (``proj_size``), a weight list read by anything else.
        """
        uses = list(node.output().uses())
        if self.dtype != "qint8" or not uses:
            return False
        for use in uses:
            if use.user.kind() not in _RNN_KERNELS or use.offset not in (2, 3):
                return False
            if use.user.inputsAt(use.offset + 1).toIValue() is None:  # has_biases must be a constant
                return False
        has_biases = bool(uses[0].user.inputsAt(uses[0].offset + 1).toIValue())
        if any(bool(use.user.inputsAt(use.offset + 1).toIValue()) != has_biases for use in uses):
            return False
        per_cell = 4 if has_biases else 2
        if len(tensors) % per_cell or any(t.dim() != (2 if i % per_cell < 2 else 1) for i, t in enumerate(tensors)):
            return False  # e.g. proj_size adds a third weight per cell
        cells = []
        for start in range(0, len(tensors), per_cell):
            w_ih, w_hh = tensors[start], tensors[start + 1]
            if w_ih.shape[0] != w_hh.shape[0] or w_hh.shape[1] * (w_ih.shape[0] // w_hh.shape[1]) != w_ih.shape[0]:
                return False
            if has_biases:
                b_ih, b_hh = tensors[start + 2].detach().float(), tensors[start + 3].detach().float()
            else:
                b_ih = b_hh = torch.zeros(w_ih.shape[0])
            # Per tensor, as eager quantize_dynamic does: fbgemm's per-channel output stage costs
            # more than it gains on the small per-step matrices (LSTM+GRU 2x256, batch 8: per
            # channel 1.07x the eager model's time, per tensor 0.93x; cosine 0.9998 either way).
            packed_ih = torch.ops.quantized.linear_prepack(self._quantize_int8(w_ih, per_channel=False), b_ih)
            packed_hh = torch.ops.quantized.linear_prepack(self._quantize_int8(w_hh, per_channel=False), b_hh)
            # reduce_range=True, as for linear_dynamic above (and as eager quantize_dynamic does).
            cells.append(torch.ops.quantized.make_quantized_cell_params_dynamic(packed_ih, packed_hh, b_ih, b_hh, True))
        with self.graph.insert_point_guard(self._after_constants()):
            values = [self.graph.insertConstant(cell) for cell in cells]
            cell_list = self.graph.create("prim::ListConstruct", values)
            cell_list.output().setType(torch._C.ListType(values[0].type()))
            self.graph.insertNode(cell_list)
        for use in uses:
            self._to_quantized_rnn(use.user, use.offset, cell_list.output())
        return True

    def _to_quantized_rnn(self, rnn: torch._C.Node, params_at: int, cells: torch._C.Value) -> None:
        inputs = list(rnn.inputs())
        inputs[params_at] = cells
        with self.graph.insert_point_guard(rnn):
            # The quantized kernels require biases; cells of a bias-free RNN carry zeros.
            inputs[params_at + 1] = self.graph.insertConstant(True)
        quantized = self.graph.create(_RNN_KERNELS[rnn.kind()], inputs, len(list(rnn.outputs())))
        if rnn.kind() == "aten::lstm":
            with self.graph.insert_point_guard(rnn):
                # The keyword-only arguments of quantized_lstm: int8 weights, dynamic activations.
                quantized.addInput(self.graph.insertConstant(torch.qint8))
                quantized.addInput(self.graph.insertConstant(True))
        quantized.insertBefore(rnn)
        for old, new in zip(rnn.outputs(), quantized.outputs()):
            new.setType(old.type())
            old.replaceAllUsesWith(new)
        rnn.destroy()

    @staticmethod
    def _is_linear_weight(use: torch._C.Use) -> bool:
        user = use.user
        if user.kind() != "aten::linear" or use.offset != 1:
            return False
        return _constant_source(user.inputsAt(2)) is not None

    def _to_dynamic_linear(self, linear: torch._C.Node, weight: torch.Tensor) -> None:
        bias_value = _constant_source(linear.inputsAt(2)).output().toIValue()
        key = (weight.data_ptr(), bias_value.data_ptr() if isinstance(bias_value, torch.Tensor) else None)
        packed = self._packed.get(key)
        if packed is None:
            qweight = self._quantize_int8(weight)
            bias = bias_value.detach().float() if isinstance(bias_value, torch.Tensor) else None
            with self.graph.insert_point_guard(self.graph.findNode("prim::Constant")):
                packed = self.graph.insertConstant(torch.ops.quantized.linear_prepack(qweight, bias))
            self._packed[key] = packed
            self._packed_for.setdefault(weight.data_ptr(), packed)
        with self.graph.insert_point_guard(linear):
            # reduce_range=True: fbgemm's int8 dot products can saturate with full-range activations.
            reduce_range = self.graph.insertConstant(True)
            output = self.graph.insert("quantized::linear_dynamic", [linear.inputsAt(0), packed, reduce_range])
        output.setType(linear.output().type())
        linear.output().replaceAllUsesWith(output)
        linear.destroy()

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
