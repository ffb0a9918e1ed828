"""Static int8 quantization of a TorchScript model: weights and activations, calibrated on data.

Route: torch's graph-mode post-training quantization on the (unfrozen) ScriptModule:
``prepare_jit`` folds BatchNorm into the conv before it (``fuse_conv_bn_jit``) and inserts
observers, calibration batches run through it, ``convert_jit`` swaps conv/linear for
``quantized::conv2d`` / ``quantized::linear`` (``conv2d_relu``, ``add_relu`` fused) with
per-channel int8 weights and int8 activations. It needs module structure (one qconfig per
submodule) and works on scripted and traced models, functional ops included.

Two preparations make models people bring go through:
- *eval specialisation*: ``self.training`` reads become ``False`` and free functions are
  inlined into the methods that call them, so ``if not training: return x`` (dropout,
  torchvision's stochastic depth) folds away instead of making an observed/unobserved branch;
- *fallback*: the outputs are compared with the float model's on the examples; while the
  cosine is under ``min_cosine``, the layers whose quantization alone hurts the outputs most
  are kept float (doubling the count, then bisecting), each try recalibrated from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from modelpress.options import QuantizeOptions
from workers.engine.errors import UnsupportedModel, summarize_torch_error
from workers.engine.inputs import Dataset
from workers.engine.methods.quantize.products import linears_from_products, own_linear_modules
from workers.engine.torchscript_graph import matching_pattern, module_types, quiet_torchscript_warnings

Progress = Callable[[str, float], None]

# Module types a user can select for static quantization, and the class names that count as each.
STATIC_TYPES: dict[str, frozenset[str]] = {
    "Conv1d": frozenset({"Conv1d"}),
    "Conv2d": frozenset({"Conv2d"}),
    "Conv3d": frozenset({"Conv3d"}),
    "Linear": frozenset({"Linear", "NonDynamicallyQuantizableLinear", "LazyLinear"}),
}
CALIBRATION_ROWS = 32  # rows per calibration / evaluation batch
EVALUATION_ROWS = 256  # rows the fidelity floor is judged on (the report's fidelity uses the same rows)
_FLOAT_LAYER_OPS = {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution", "aten::linear"}
SYNTHETIC_WARNING = (
    "static quantization was calibrated on random inputs of input_shape, not on real data: "
    "activation ranges may not match real inputs; upload a data file for a faithful result"
)


@dataclass
class _Try:
    model: torch.jit.ScriptModule
    cosine: float
    float_layers: tuple[str, ...]


def quantize_static(
    model: torch.jit.ScriptModule,
    options: QuantizeOptions,
    data: Dataset,
    progress: Progress,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Quantize conv and linear layers to int8 weights and activations; return the model and details."""
    engine = _select_engine()
    observer, reduce_range, per_channel = options.observer, bool(options.reduce_range), options.per_channel
    min_cosine = float(options.min_cosine or 0.0)
    batches = _batches(data.inputs, CALIBRATION_ROWS)
    calibration = batches[: options.calibration_batches]
    evaluation = _batches(data.head(EVALUATION_ROWS), CALIBRATION_ROWS)

    progress("preparing", 0.02)
    model = model.eval()
    with torch.no_grad(), quiet_torchscript_warnings():
        reference = [_call(model, batch) for batch in evaluation]
    _specialize_for_inference(model)
    products = linears_from_products(model)
    layers, kept = static_layers(model, options)
    qconfig = _qconfig(observer, reduce_range, per_channel)
    ranking_qconfig = _qconfig("minmax", reduce_range, per_channel)  # ranking needs speed, not the best ranges

    def attempt(float_layers: tuple[str, ...], batches_: list[Any], only: str | None = None) -> _Try:
        names = dict.fromkeys((*kept, *float_layers))
        config: dict[str, Any] = {"": None, only: ranking_qconfig} if only else {"": qconfig, **names}
        quantized = _quantize(model, config, batches_)
        with torch.no_grad(), quiet_torchscript_warnings():
            outputs = [_call(quantized, batch) for batch in evaluation]
        return _Try(quantized, _cosine(reference, outputs), float_layers)

    progress("calibrating", 0.1)
    best = attempt((), calibration)
    cosine_all = best.cosine
    sensitivity: dict[str, float] = {}
    if best.cosine < min_cosine and layers:
        # Each layer quantized alone, calibrated on one batch: a cheap ranking of the damage it does.
        for index, name in enumerate(sorted(layers)):
            sensitivity[name] = attempt((), calibration[:1], only=name).cosine
            progress("ranking layers", 0.2 + 0.4 * (index + 1) / len(layers))
        order = tuple(sorted(layers, key=lambda name: (sensitivity[name], name)))
        best = _smallest_fallback(
            order,
            min_cosine,
            lambda chosen: attempt(chosen, calibration),
            lambda fraction: progress("falling back", 0.6 + 0.35 * fraction),
        )
    progress("quantized", 0.97)
    unreached = _product_layers(model)
    return best.model, _details(
        unreached,
        products,
        module_types(model),
        best,
        layers,
        kept,
        sensitivity,
        cosine_all,
        settings={
            "engine": engine,
            "observer": observer,
            "reduce_range": reduce_range,
            "per_channel": per_channel,
            "min_cosine": min_cosine,
        },
        calibration={
            "batches": len(calibration),
            "samples": sum(_rows(b) for b in calibration),
            "source": "random inputs of input_shape" if data.synthetic else "data file",
        },
        synthetic=data.synthetic,
    )


def static_layers(
    model: torch.jit.ScriptModule, options: QuantizeOptions
) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """The layers static int8 quantizes (name -> type), and those it keeps float (name -> (type, reason))."""
    selected = set().union(*(STATIC_TYPES.get(name, frozenset({name})) for name in options.modules))
    layers: dict[str, str] = {}
    kept: dict[str, tuple[str, str]] = {}
    all_layer_types = set().union(*STATIC_TYPES.values())
    own_linear = own_linear_modules(model)  # a Conv1D made aten::linear (products.py) is a Linear
    for name, kind in module_types(model).items():
        kind = "Linear" if kind not in all_layer_types and name in own_linear else kind
        if not name or kind not in all_layer_types:
            continue
        pattern = matching_pattern(name, list(options.exclude))
        if kind not in selected:
            kept[name] = (kind, f"type {kind} not selected")
        elif pattern is not None:
            kept[name] = (kind, f"excluded by pattern {pattern!r}")
        else:
            layers[name] = kind
    return layers, kept


def _smallest_fallback(
    order: tuple[str, ...], floor: float, attempt: Callable[[tuple[str, ...]], _Try], progress: Callable[[float], None]
) -> _Try:
    """Fewest of the most harmful layers kept float to reach ``floor``: double the count, then bisect."""
    tries: dict[int, _Try] = {}

    def at(count: int) -> _Try:
        if count not in tries:
            tries[count] = attempt(order[:count])
            progress(min(len(tries) / (2 * math.log2(len(order) + 1) + 1), 1.0))
        return tries[count]

    count = 1
    while count < len(order) and at(count).cosine < floor:
        count *= 2
    high = min(count, len(order))
    low = count // 2  # the largest count known (or assumed, for 0) to miss the floor
    if at(high).cosine < floor:
        return at(high)  # every layer float: nothing left to give back
    while high - low > 1:
        middle = (low + high) // 2
        if at(middle).cosine >= floor:
            high = middle
        else:
            low = middle
    return at(high)


# --------------------------------------------------------------------------- torch plumbing


def _select_engine() -> str:
    """fbgemm's successor ``x86``: the kernels a plain ``torch.jit.load`` on an x86 CPU uses."""
    supported = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in supported:
            torch.backends.quantized.engine = engine
            return engine
    raise UnsupportedModel(f"static int8 needs the x86 or fbgemm quantized engine; this torch has {supported}")


def _qconfig(observer: str, reduce_range: bool, per_channel: bool) -> Any:
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        PerChannelMinMaxObserver,
    )

    activation = {"minmax": MinMaxObserver, "histogram": HistogramObserver}[observer]
    if per_channel:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=activation.with_args(reduce_range=reduce_range), weight=weight)


def _quantize(model: torch.jit.ScriptModule, config: dict[str, Any], batches: list[Any]) -> torch.jit.ScriptModule:
    """prepare_jit -> calibrate -> convert_jit on a copy; torch's failures become UnsupportedModel."""
    from torch.ao.quantization import convert_jit, prepare_jit

    try:
        with torch.no_grad(), quiet_torchscript_warnings():
            prepared = prepare_jit(model, config)  # copies: `model` stays float
            for batch in batches:
                _call(prepared, batch)
            return convert_jit(prepared, inplace=True)
    except UnsupportedModel:
        raise
    except Exception as error:
        raise UnsupportedModel(
            f"static quantization could not be applied to this model: {summarize_torch_error(error)}"
        ) from None


def _specialize_for_inference(model: torch.jit.ScriptModule) -> None:
    """Make every method see ``training == False`` and inline the free functions it calls.

    Method graphs are shared by every instance of a compiled class, and the model is in eval
    mode throughout, so the rewrite holds for all of them. A graph that also calls methods of
    submodules is not inlined (inlining would erase the module boundaries graph-mode
    quantization keys its per-layer settings on); its own ``training`` reads still fold.
    """
    seen: set[tuple[str, str]] = set()
    for _, module in model.named_modules():
        for method in module._c._method_names():
            # Keyed by compiled type, not id(graph): each `.graph` is a fresh Python wrapper,
            # freed at once, so ids repeat and whole classes of modules were skipped.
            key = (module._c._type().qualified_name(), method)
            if key in seen:
                continue
            seen.add(key)
            graph = module._c._get_method(method).graph
            if graph.findNode("prim::CallFunction") is not None and graph.findNode("prim::CallMethod") is None:
                torch._C._jit_pass_inline(graph)
            for node in list(graph.findAllNodes("prim::GetAttr")):
                if node.s("name") == "training":
                    with graph.insert_point_guard(node):
                        node.output().replaceAllUsesWith(graph.insertConstant(False))
            torch._C._jit_pass_constant_propagation(graph)
            torch._C._jit_pass_dce(graph)


def quantized_op_counts(model: torch.jit.ScriptModule) -> dict[str, int]:
    """``quantized::*`` ops over every method graph of the model: what really runs in int8."""
    counts: dict[str, int] = {}
    for _, module in model.named_modules():
        for method in module._c._method_names():
            for node in _nodes(module._c._get_method(method).graph):
                if node.kind().startswith("quantized::"):
                    counts[node.kind()] = counts.get(node.kind(), 0) + 1
    return counts


def _nodes(graph: torch._C.Graph) -> list[torch._C.Node]:
    """Every node of a graph, nested blocks included."""
    found: list[torch._C.Node] = []
    pending = list(graph.nodes())
    while pending:
        node = pending.pop()
        found.append(node)
        for block in node.blocks():
            pending.extend(block.nodes())
    return found


def _float_weight_names(model: torch.jit.ScriptModule) -> set[str]:
    """Debug names of the weights that conv/linear ops still read in float after ``convert_jit``.

    The converted forward is inlined into the root; a float layer's weight shows up as a
    constant named after its path (``self.features.3.weight``), a quantized one as a packed
    parameter object without it.
    """
    names = set()
    for node in _nodes(model.graph):
        if node.kind() in _FLOAT_LAYER_OPS:
            names.add(node.inputsAt(1).debugName())
    return names


def _is_float(layer: str, float_weights: set[str]) -> bool:
    prefix = f"self.{layer}.weight"
    return any(name == prefix or name.startswith(prefix + ".") for name in float_weights)


# --------------------------------------------------------------------------- data and report


def _batches(inputs: Any, rows: int) -> list[Any]:
    if isinstance(inputs, (tuple, list)):  # several model inputs: split each the same way
        parts = [_batches(tensor, rows) for tensor in inputs]
        return [tuple(batch) for batch in zip(*parts)]
    return list(inputs.split(rows))


def _rows(batch: Any) -> int:
    return int((batch[0] if isinstance(batch, tuple) else batch).shape[0])


def _call(model: torch.jit.ScriptModule, batch: Any) -> Any:
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def _cosine(reference: list[Any], candidate: list[Any]) -> float:
    a = torch.cat([t.detach().float().flatten() for out in reference for t in _flat(out)])
    b = torch.cat([t.detach().float().flatten() for out in candidate for t in _flat(out)])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12)) if a.numel() else 1.0


def _flat(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flat(item)]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _flat(output[key])]
    return []


def _product_layers(model: torch.jit.ScriptModule) -> list[str]:
    """Modules whose own weight is the matrix of an addmm/matmul/mm (GPT-2's ``Conv1D``): linear layers
    that torch's graph-mode quantization does not match (its patterns are ``aten::linear`` and convs)."""
    found = []
    for name, module in model.named_modules():
        if "forward" not in module._c._method_names():
            continue
        for node in _nodes(module._c._get_method("forward").graph):
            position = {"aten::addmm": 2, "aten::matmul": 1, "aten::mm": 1}.get(node.kind())
            source = node.inputsAt(position).node() if position is not None else None
            if source is not None and source.kind() in ("aten::t", "aten::numpy_T"):
                source = source.inputsAt(0).node()
            if source is not None and source.kind() == "prim::GetAttr":
                found.append(name)
                break
    return found


def _details(
    unreached: list[str],
    products: list[str],
    classes: dict[str, str],
    best: _Try,
    layers: dict[str, str],
    kept: dict[str, tuple[str, str]],
    sensitivity: dict[str, float],
    cosine_all: float,
    settings: dict[str, Any],
    calibration: dict[str, Any],
    synthetic: bool,
) -> dict[str, Any]:
    float_weights = _float_weight_names(best.model)
    quantized, kept_float = [], []
    for name in sorted(layers):
        if name in best.float_layers:
            kept_float.append(
                {
                    "module": name,
                    "type": layers[name],
                    "reason": f"fallback: quantized alone it gives cosine {sensitivity[name]:.5f}",
                }
            )
        elif not _is_float(name, float_weights):
            spelled = {"class": classes[name]} if classes.get(name, layers[name]) != layers[name] else {}
            quantized.append({"module": name, "type": layers[name], "kernel": "static", **spelled})
        else:
            kept_float.append(
                {
                    "module": name,
                    "type": layers[name],
                    "reason": "its op was not quantized by graph-mode quantization (not a plain conv/linear call)",
                }
            )
    kept_float += [{"module": name, "type": kind, "reason": reason} for name, (kind, reason) in sorted(kept.items())]
    ops = quantized_op_counts(best.model)
    notes = [
        "weights int8 per output channel (symmetric), activations uint8 per tensor; BatchNorm folded into the "
        "conv before it, conv+relu and add+relu fused",
        "the float model and each candidate were compared on up to "
        f"{EVALUATION_ROWS} example rows; layers are kept float while the cosine is under min_cosine",
    ]
    if products:
        notes.append(
            f"{len(products)} linear layer(s) written as a product with their own weight (e.g. transformers' "
            "Conv1D, addmm with a [in, out] weight) were made aten::linear, the weight stored [out, in]"
        )
    warnings = []
    if synthetic:
        notes.append(SYNTHETIC_WARNING)
        warnings.append(SYNTHETIC_WARNING)
    if unreached:
        warnings.append(
            f"{len(unreached)} linear layer(s) written as addmm/matmul with their own weight (e.g. "
            f"transformers' Conv1D: {', '.join(unreached[:3])}) stay float: they could not be rewritten as "
            "aten::linear, the only linear form torch's static graph-mode quantization matches (a weight read "
            "elsewhere too, or a bias the layer does not own); mode dynamic quantizes them"
        )
    if not quantized:
        warnings.append("static quantization left every layer in float: the model was not made smaller")
    if best.cosine < settings["min_cosine"]:
        warnings.append(
            f"the fidelity floor min_cosine={settings['min_cosine']} was not met (cosine {best.cosine:.5f})"
        )
    return {
        "mode": "static",
        **settings,
        "calibration": calibration,
        "cosine_all_layers_int8": round(cosine_all, 6),
        "cosine": round(best.cosine, 6),
        "quantized_modules": quantized,
        "kept_float": kept_float,
        "fallback": [{"module": name, "cosine_alone": round(sensitivity[name], 6)} for name in best.float_layers],
        "sensitivity": {name: round(value, 6) for name, value in sorted(sensitivity.items(), key=lambda kv: kv[1])},
        "quantized_ops": ops,
        "counts": {"static": len(quantized), "kept_float": len(kept_float), "fallback": len(best.float_layers)},
        "notes": notes,
        "warnings": warnings,
    }
