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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modelpress.options import QuantizeOptions
from workers.engine.errors import UnsupportedModel
from workers.engine.linear_forms import is_matmul_weight
from workers.engine.methods.quantize.attention import expand_fused_attention
from workers.engine.methods.quantize.embedding import has_lookup
from workers.engine.methods.quantize.rewriter import GraphRewriter, constant_source, leaf_uses
from workers.engine.methods.quantize.static import quantize_static
from workers.engine.torchscript_graph import (
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
    "Embedding": frozenset({"Embedding"}),
    "EmbeddingBag": frozenset({"EmbeddingBag"}),
}


def quantize(
    model: torch.jit.ScriptModule,
    options: QuantizeOptions,
    data: object | None = None,
    progress: Progress | None = None,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Quantize the weights of the selected module types; return the model and what was done.

    ``w_q = round(w / s_c)`` with one symmetric scale ``s_c = max|w_c| / 127`` per output
    channel (or per tensor), int8; float16 casts the weights instead.
    """
    progress = progress or (lambda stage, fraction: None)
    if options.mode in ("static", "qat"):
        if data is None:
            raise UnsupportedModel(f"{options.mode} quantization needs example inputs to calibrate on")
        if options.mode == "qat":
            from workers.engine.methods.quantize.qat import quantize_qat

            return quantize_qat(model, options, data, progress)
        return quantize_static(model, options, data, progress)
    if options.mode != "dynamic":
        raise UnsupportedModel(f"quantization mode {options.mode!r} is not available")
    dtype = options.dtype
    selected = _selected_class_names(options.modules)
    exclude = list(options.exclude)
    per_channel = options.per_channel

    progress("freezing", 0.05)
    owners = parameter_owners(model)
    frozen = freeze_forward(model)
    graph = frozen.graph
    with quiet_torchscript_warnings():
        fold_tensor_attributes(frozen)
    roles, read_as_weight = _layer_roles(graph, owners)
    plan = _Plan({name: tensor.numel() for name, tensor in model.named_parameters()})
    for owner in owners.values():
        plan.classify(
            owner,
            roles.get(owner.module, owner.module_type),
            selected,
            exclude,
            is_weight="weight" in owner.name.rpartition(".")[2] or owner.name in read_as_weight,
        )
    if not plan.targets:
        details = plan.details(dtype, frozen=False)
        details["notes"] = ["no weight matched the selected module types, so the model is returned unchanged"]
        return model, details

    rewriter = GraphRewriter(graph, dtype=dtype, per_channel=per_channel)
    with quiet_torchscript_warnings():
        if dtype == "qint8":
            chosen = {
                tensor.data_ptr()
                for tensor in model.parameters()
                if (owner := owners.get(tensor.data_ptr())) is not None and owner.name in plan.targets
            }
            expanded = expand_fused_attention(graph, lambda value: _constant_pointer(value) in chosen)
            plan.expanded = len(expanded)
        constants = [(node, tensor) for node, tensor in tensor_constants(graph)]
        for index, (node, tensor) in enumerate(constants):
            owner = owners.get(tensor.data_ptr())
            if owner is not None and owner.name in plan.targets:
                if rewriter.rewrite_embedding(node, tensor, list(leaf_uses(node.output()))):
                    kernel = "embedding"
                else:
                    kernel = rewriter.rewrite_tensor(node, tensor)
                plan.record(owner, kernel, rewriter.last_reason, tensor.numel())
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
                for owner, was_chosen, tensor in zip(names, chosen, tensors):
                    if owner is not None and was_chosen:
                        plan.record(owner, kernel, reason, tensor.numel())
        torch._C._jit_pass_dce(graph)
        torch._C._jit_pass_lint(graph)
    plan.match_pooled(dict(model.named_parameters()))
    progress("quantized", 0.9)
    return frozen, plan.details(dtype, frozen=True)


def _layer_roles(graph: torch._C.Graph, owners: dict[int, ParameterOwner]) -> tuple[dict[str, str], set[str]]:
    """Module -> the layer type its weights play in the graph, for modules of classes not listed in
    ``MODULE_TYPE_ALIASES``: read as an embedding table -> ``Embedding`` (``EmbeddingBag``), as the
    matrix of a product (``Conv1D``'s addmm, ``x @ W``, ``F.linear``) -> ``Linear``; and the
    parameters read so, whatever their names (a hand-written layer's ``self.proj``)."""
    known = set().union(*MODULE_TYPE_ALIASES.values())
    roles: dict[str, str] = {}
    read_as_weight: set[str] = set()
    for node, tensor in tensor_constants(graph):
        owner = owners.get(tensor.data_ptr())
        if owner is None or owner.module_type in known:
            continue
        uses = list(leaf_uses(node.output()))
        if has_lookup(uses) or any(is_matmul_weight(use) for use in uses):
            read_as_weight.add(owner.name)
        if has_lookup(uses):
            bag = any(use.user.kind() == "aten::embedding_bag" for use in uses)
            roles[owner.module] = "EmbeddingBag" if bag else "Embedding"
        elif any(is_matmul_weight(use) for use in uses):
            roles.setdefault(owner.module, "Linear")
    return roles, read_as_weight


# --------------------------------------------------------------------------- planning


@dataclass
class _ModuleRecord:
    module: str
    module_type: str  # the layer type it counts as (a GPT-2 Conv1D counts as Linear)
    class_name: str  # the module's own class
    tensors: list[str] = field(default_factory=list)
    kernel: str | None = None
    reason: str | None = None

    def entry(self) -> dict[str, Any]:
        return {
            "module": self.module or "(root)",
            "type": self.module_type,
            **({"class": self.class_name} if self.class_name != self.module_type else {}),
            "tensors": self.tensors,
        }


class _Plan:
    """Which parameters to quantize, and afterwards what happened to each module."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes  # parameter -> elements, for the coverage
        self.weights = sum(sizes.values())
        self.quantized_weights = 0
        self.float_by_type: dict[str, int] = {}  # layer type -> parameter elements left float
        self.types: dict[str, tuple[str, str]] = {}  # module -> (layer type, class)
        self.targets: dict[str, ParameterOwner] = {}
        self.reached: set[str] = set()
        self.done: dict[str, _ModuleRecord] = {}
        self.kept: dict[str, _ModuleRecord] = {}
        self.expanded = 0  # fused attention ops spelled out as linear calls
        self.recurrent = 0  # LSTM/GRU weight lists given the quantized recurrent kernels

    def classify(
        self, owner: ParameterOwner, kind: str, selected: set[str], exclude: list[str], is_weight: bool
    ) -> None:
        """``kind``: the layer type the owner counts as (its class, or the role its weight plays)."""
        self.types[owner.module] = (kind, owner.module_type)
        if kind not in selected:
            return self._keep(owner, f"type {kind or 'unknown'} not selected")
        pattern = matching_pattern(owner.module, exclude)
        if pattern is not None:
            return self._keep(owner, f"excluded by pattern {pattern!r}")
        if is_weight:
            self.targets[owner.name] = owner

    def record(self, owner: ParameterOwner, kernel: str, reason: str | None, weights: int) -> None:
        entry = self.done.setdefault(owner.module, _ModuleRecord(owner.module, *self.types[owner.module]))
        self.quantized_weights += weights
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
                (
                    other
                    for other in sorted(self.reached)
                    if parameters[other].shape == parameters[name].shape
                    and torch.equal(parameters[other], parameters[name])
                ),
                None,
            )
            if twin is None:
                self._keep(owner, "not a constant of the frozen forward graph (unused, or reassigned at run time)")
            else:
                twin_module = self.targets[twin].module
                self.record(
                    owner,
                    self.done[twin_module].kernel or "weight_only",
                    f"identical to {twin}, stored once",
                    parameters[name].numel(),
                )

    def details(self, dtype: str, frozen: bool) -> dict[str, Any]:
        quantized = [
            {**r.entry(), "kernel": r.kernel, **({"why": r.reason} if r.reason else {})}
            for r in sorted(self.done.values(), key=lambda r: r.module)
        ]
        kept = [{**r.entry(), "reason": r.reason} for r in sorted(self.kept.values(), key=lambda r: r.module)]
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
            notes.append(
                "LSTM/GRU cells use per-tensor int8 weights whatever per_channel says, as eager "
                "quantize_dynamic does: on their small per-step matrices it is the faster kernel"
            )
        if any(r["kernel"] == "embedding" for r in quantized):
            notes.append(
                "embedding tables are int8 with a float scale and offset per row (torch's byte-rowwise "
                "format); lookups dequantize only the rows they read, a tied output layer the whole table"
            )
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
                "embedding": sum(r["kernel"] == "embedding" for r in quantized),
                "kept_float": len(kept),
            },
            "coverage": {
                "quantized_weights": self.quantized_weights,
                "weights": self.weights,
                "fraction": round(self.quantized_weights / max(self.weights, 1), 4),
                "float_by_type": dict(sorted(self.float_by_type.items(), key=lambda kv: -kv[1])),
            },
            "notes": notes,
        }

    def _keep(self, owner: ParameterOwner, reason: str) -> None:
        kind, class_name = self.types.get(owner.module, (owner.module_type, owner.module_type))
        entry = self.kept.setdefault(owner.module, _ModuleRecord(owner.module, kind, class_name, reason=reason))
        self.float_by_type[kind] = self.float_by_type.get(kind, 0) + self.sizes.get(owner.name, 0)
        entry.tensors.append(owner.name.rpartition(".")[2])


def _selected_class_names(modules: list[str]) -> set[str]:
    names: set[str] = set()
    for module in modules:
        names |= MODULE_TYPE_ALIASES.get(module, frozenset({module}))
    return names


def _constant_pointer(value: torch._C.Value) -> int | None:
    """Storage pointer of the tensor constant behind ``value``, if it is one."""
    node = constant_source(value)
    tensor = node.output().toIValue() if node is not None else None
    return tensor.data_ptr() if isinstance(tensor, torch.Tensor) else None


def _reason_for_list(node: torch._C.Node) -> str:
    users = sorted({use.user.kind() for use in node.output().uses()})
    return f"read by {', '.join(users)}, which has no int8 kernel here"
