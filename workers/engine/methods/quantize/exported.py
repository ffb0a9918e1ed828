"""Quantizing a torch.export program (``.pt2``): int8 through PT2E, or float16 weights in the graph.

The program is compressed as a program: weights are rewritten in the unlifted graph
(``ExportedProgram.module()``) and the result is re-exported with the original's dynamic dimensions.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.export import ExportedProgram

from modelpress.formats import EXPORTED
from modelpress.options import QuantizeOptions
from workers.engine.analysis.program_graph import attribute, delete_attribute, is_attribute, module_path
from workers.engine.errors import InvalidInput, UnsupportedModel, summarize_torch_error
from workers.engine.formats.exported import fixed_batch, reexport
from workers.engine.inputs import Dataset
from workers.engine.measure import run_model
from workers.engine.methods.quantize.exported_forms import MIN_QUANTIZED_ELEMENTS, canonical_linears, int8_embeddings
from workers.engine.methods.quantize.static import SYNTHETIC_WARNING
from workers.engine.torchscript_graph import matching_pattern

Progress = Callable[[str, float], None]


_LINEAR = torch.ops.aten.linear.default


_PT2E_TYPES = {torch.ops.aten.linear.default: "Linear", torch.ops.aten.conv2d.default: "Conv2d"}


CALIBRATION_ROWS = 32


CALIBRATION_LIMIT = 256  # rows run through the observers


def quantize_program(
    program: ExportedProgram,
    options: QuantizeOptions,
    data: Dataset,
    progress: Progress,
    train: Callable[[torch.fx.GraphModule], Any] | None = None,
) -> tuple[ExportedProgram, dict[str, Any]]:
    """int8 through PT2E (torchao's x86 quantizer): ``dynamic`` quantizes Linear weights and, per
    batch at run time, their inputs; ``static`` quantizes conv and linear weights and activations
    with ranges calibrated on the examples. ``dtype: float16`` stores Linear weights as float16.

    The converted graph holds int8 weights with ``quantized_decomposed`` (de)quantize ops around
    float ``aten`` ops: eagerly it dequantizes on every call; ``torch.compile`` / AOTInductor fuse
    the patterns into int8 kernels.

    ``qat`` (``exported_qat.quantize_program_qat``, which passes ``train``): PT2E's QAT flow, ``prepare_qat_pt2e``
    (fake quantization of weights and activations, BatchNorm kept and trained), ``train(prepared)``,
    then ``convert_pt2e`` as for static.
    """
    if options.dtype == "float16":
        if options.mode != "dynamic":
            raise UnsupportedModel(f"{options.mode} quantization is int8; drop dtype float16 or use mode dynamic")
        return _float16_weights(program, options, progress)
    if options.mode == "qat" and train is None:
        raise UnsupportedModel("mode qat trains: call exported_qat.quantize_exported, which passes `train`")
    static = options.mode in ("static", "qat")
    modules = set(options.modules)
    covered = {*_PT2E_TYPES.values(), "Embedding"}
    if not modules & covered:
        raise UnsupportedModel(
            f"on .pt2 programs int8 covers {', '.join(sorted(covered))} layers; add one of them to quantize.modules"
        )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

    module = program.module()
    forms = canonical_linears(module)
    embeddings, skipped_tables = [], []
    if not static and "Embedding" in modules:

        def excluded(owner: str) -> str | None:
            pattern = matching_pattern(owner, list(options.exclude))
            return f"excluded by {pattern!r}" if pattern else None

        embeddings, skipped_tables = int8_embeddings(module, excluded)
    # 7-bit activations unless a static spec says otherwise: oneDNN's int8 kernels on CPUs without
    # VNNI (AVX2) sum u8 x s8 pairs in int16 and saturate with full-range activations; the compiled
    # program then drifts from the program (measured: 16% of the largest output on an MLP).
    reduce_range = options.reduce_range is not False  # mode dynamic has no such option: 7 bits
    quantizer, chosen, skipped = _x86_quantizer(
        module, modules, list(options.exclude), static, reduce_range, qat=train is not None
    )
    recurrent = [layer for layer in _recurrent_layers(module) if layer["type"] in modules]
    skipped += recurrent + skipped_tables
    if not chosen and not embeddings:
        raise UnsupportedModel(
            "no layer of the program can be quantized ("
            + (
                ", ".join(sorted({s["reason"] for s in skipped}))
                or f"the program has no {' or '.join(sorted(modules))} op"
            )
            + ")"
        )
    progress("preparing", 0.1)
    _split_source_partitions(module)
    fixed = fixed_batch(program)
    rows = fixed or CALIBRATION_ROWS  # a program exported with a fixed batch accepts only that many rows
    limit = min(len(data), CALIBRATION_LIMIT)
    batches = [data.rows(slice(start, start + rows)) for start in range(0, limit - rows + 1 if fixed else limit, rows)]
    if not batches:
        raise InvalidInput(
            f"the program was exported for batches of exactly {fixed} rows and the data has "
            f"{len(data)}: upload at least {fixed} rows"
        )
    trained = None
    if chosen:
        try:
            with _folding_only_the_convolutions_present(module):  # QAT's prepare fuses conv-bn the same way
                prepared = (prepare_qat_pt2e if train is not None else prepare_pt2e)(module, quantizer)
        except Exception as error:
            raise UnsupportedModel(
                f"the x86 quantizer could not annotate the program: {summarize_torch_error(error)}"
            ) from None
        if train is not None:  # the fake quantizers observed every training batch: no calibration after
            trained, batches = train(prepared), []
        for index, batch in enumerate(batches if static else batches[:1]):
            run_model(prepared, batch)
            progress("calibrating" if static else "tracing", 0.1 + 0.6 * (index + 1) / len(batches))
        with _folding_only_the_convolutions_present(prepared):
            converted = convert_pt2e(prepared)
    else:  # only embedding tables: nothing for PT2E to observe
        converted = module
    _drop_unused_state(converted)
    exported = reexport(converted, program, data.head(fixed or 2))
    progress("quantizing", 1.0)
    details = {
        "format": EXPORTED,
        "mode": "static" if static else "dynamic",
        "route": "PT2E, torchao X86InductorQuantizer",
        "reduce_range": reduce_range,
        "quantized": chosen + embeddings,
        "left_float": skipped,
        "linear_forms": forms or None,
        "calibration": {"batches": len(batches), "rows": sum(int(b[0].shape[0]) for b in batches)} if static else None,
        "notes": [
            "int8 weights (per output channel) with quantize/dequantize ops in the graph; run it with "
            "torch.compile or AOTInductor for int8 kernels (evaluation.runtime), eagerly it dequantizes "
            "on every call",
            "loading the program needs `import torchao` first (it registers the quantized_decomposed operators)",
        ],
    }
    if trained is not None:
        details["qat_history"] = trained
    if static and data.synthetic:
        details["warnings"] = [SYNTHETIC_WARNING]
    float_weights = sum(layer["weights"] for layer in recurrent)
    int8_weights = sum(entry["weights"] or 0 for entry in chosen + embeddings)
    if float_weights > int8_weights:
        details.setdefault("warnings", []).append(
            f"most weights stay float: the recurrent layers ({', '.join(layer['module'] or layer['op'] for layer in recurrent)}; "
            f"{float_weights} weights) have no int8 kernel in an exported program, against {int8_weights} int8 "
            "weights; use quantize.dtype float16 to halve them, or upload TorchScript for int8 LSTM/GRU"
        )
    return exported, details


def _float16_weights(
    program: ExportedProgram, options: QuantizeOptions, progress: Progress
) -> tuple[ExportedProgram, dict[str, Any]]:
    """Store the weights of every ``aten.linear`` and recurrent op (LSTM, GRU, RNN) as float16, cast
    back to float inside the program."""
    exclude = list(options.exclude)
    modules = set(options.modules)
    if not modules & {"Linear", *_RECURRENT_OPS.values()}:
        raise UnsupportedModel(
            "on .pt2 programs float16 weights cover Linear, LSTM, GRU and RNN layers; add one "
            "of them to quantize.modules"
        )
    module = program.module()
    graph = module.graph
    quantized, skipped = [], []
    replaced: set[str] = set()
    for kind, weight_node in _stored_weights(graph, skipped):
        name = weight_node.target
        if name in replaced:
            continue
        weight = attribute(module, name)
        owner = name.rpartition(".")[0]
        reason = f"{kind} not selected" if kind not in modules else _quantize_skip_reason(weight, owner, exclude)
        if reason:
            skipped.append({"module": owner, "weight": name, "type": kind, "reason": reason})
            continue
        stored = "_mp_" + name.replace(".", "_") + "_fp16"
        module.register_buffer(stored, weight.detach().to(torch.float16))
        with graph.inserting_before(weight_node):
            cast = graph.call_function(
                torch.ops.aten._to_copy.default, (graph.get_attr(stored),), {"dtype": weight.dtype}
            )
        weight_node.replace_all_uses_with(cast)
        graph.erase_node(weight_node)
        delete_attribute(module, name)
        replaced.add(name)
        quantized.append(
            {"module": owner, "weight": name, "type": kind, "dtype": "float16", "shape": list(weight.shape)}
        )
    if not quantized:
        raise UnsupportedModel(
            "no weight of the program could be stored as float16 ("
            + (", ".join(sorted({s["reason"] for s in skipped})) or "the program has no aten.linear or recurrent op")
            + ")"
        )
    graph.lint()
    module.recompile()
    progress("quantizing", 1.0)
    return reexport(module, program, None), {
        "format": EXPORTED,
        "mode": "weight-only",
        "quantized": quantized,
        "left_float": skipped,
        "notes": ["weights are stored in float16"],
    }


_RECURRENT_OPS = {
    torch.ops.aten.lstm.input: "LSTM",
    torch.ops.aten.gru.input: "GRU",
    torch.ops.aten.rnn_tanh.input: "RNN",
    torch.ops.aten.rnn_relu.input: "RNN",
}


DYNAMIC_DEFAULT = ("Linear", "LSTM", "GRU")


def _stored_weights(graph: torch.fx.Graph, skipped: list[dict[str, Any]]) -> Iterator[tuple[str, torch.fx.Node]]:
    """(layer type, get_attr node) of each weight matrix a linear or recurrent op reads from the module;
    a weight computed in the graph goes to ``skipped``."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _LINEAR:
            candidates, kind = [node.args[1]], "Linear"
        elif node.target in _RECURRENT_OPS:
            candidates, kind = list(node.args[2]), _RECURRENT_OPS[node.target]  # the flat parameter list
        else:
            continue
        for weight_node in candidates:
            if not isinstance(weight_node, torch.fx.Node) or weight_node.op != "get_attr":
                skipped.append(
                    {"op": node.name, "type": kind, "reason": "the weight is computed in the graph, not stored"}
                )
            elif weight_node.meta.get("val") is None or weight_node.meta["val"].dim() == 2:  # matrices, not biases
                yield kind, weight_node


def _recurrent_layers(module: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """The recurrent ops of a program's module, named by their module, with their weight counts
    (what dynamic int8 leaves float)."""
    return [
        {
            "op": node.name,
            "module": module_path(node),
            "type": _RECURRENT_OPS[node.target],
            "weights": sum(
                attribute(module, w.target).numel()
                for w in node.args[2]
                if isinstance(w, torch.fx.Node) and w.op == "get_attr"
            ),
            "reason": "no int8 kernel runs an exported recurrent op; use dtype float16 for them (2x smaller), "
            "or upload TorchScript for int8 LSTM/GRU",
        }
        for node in module.graph.nodes
        if node.op == "call_function" and node.target in _RECURRENT_OPS
    ]


def _quantize_skip_reason(weight: torch.Tensor, owner: str, exclude: list[str]) -> str | None:
    pattern = matching_pattern(owner, exclude)
    if pattern:
        return f"excluded by {pattern!r}"
    if not weight.is_floating_point() or weight.dim() != 2:
        return "not a 2-D float weight"
    if weight.numel() < MIN_QUANTIZED_ELEMENTS:
        return f"fewer than {MIN_QUANTIZED_ELEMENTS} weights"
    return None


def _x86_quantizer(
    module: torch.nn.Module, modules: set[str], exclude: list[str], static: bool, reduce_range: bool, qat: bool = False
):
    """The x86 quantizer set for ``modules`` (by op) minus ``exclude`` (by module path); what it covers."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    config = x86.get_default_x86_inductor_quantization_config(
        is_qat=qat, is_dynamic=not static, reduce_range=reduce_range
    )
    quantizer = x86.X86InductorQuantizer()
    chosen, skipped, excluded = [], [], set()
    for node in module.graph.nodes:
        kind = _PT2E_TYPES.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        owner = module_path(node)
        pattern = matching_pattern(owner, exclude)
        if kind not in modules or (not static and kind != "Linear"):
            skipped.append(
                {
                    "op": node.name,
                    "module": owner,
                    "reason": f"{kind} not selected"
                    if kind not in modules
                    else "dynamic int8 covers Linear (use mode static for convolutions)",
                }
            )
        elif pattern:
            skipped.append({"op": node.name, "module": owner, "reason": f"excluded by {pattern!r}"})
            excluded.add(owner)
        elif not is_attribute(node.args[1]):
            skipped.append(
                {
                    "op": node.name,
                    "module": owner,
                    "reason": "its weight is computed in the graph (a "
                    "table tied to an int8 embedding is dequantized where it is read)",
                }
            )
            excluded.add(owner)
        else:
            chosen.append(
                {
                    "op": node.name,
                    "module": owner,
                    "type": kind,
                    "weights": attribute(module, node.args[1].target).numel(),
                }
            )
    if static and modules >= {"Conv2d", "Linear"}:
        quantizer.set_global(config)
    else:
        for kind, op in (("Linear", torch.nn.functional.linear), ("Conv2d", torch.nn.functional.conv2d)):
            if kind in modules and (static or kind == "Linear"):
                quantizer.set_function_type_qconfig(op, config)
    for owner in excluded:
        quantizer.set_module_name_qconfig(owner, None)
    return quantizer, chosen, skipped


def _split_source_partitions(module: torch.fx.GraphModule) -> None:
    """Give each op its own source partition before the x86 quantizer annotates.

    Exported graphs carry no ``source_fn_stack``; partitions then fall back to the module path, so
    a module called twice (resnet's shared ``relu``) makes one partition with two outputs and the
    quantizer fails ("Input partition has more than one output node"). One partition per op, typed
    by the module that made it, is what the quantizer's patterns expect."""
    for node in module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or node.meta.get("source_fn_stack") or not stack:
            continue
        path, kind = list(stack.values())[-1]
        if isinstance(kind, str):
            owner, _, name = kind.rpartition(".")
            kind = getattr(sys.modules.get(owner), name, None)
        if isinstance(kind, type):
            node.meta["source_fn_stack"] = [(f"{path}#{node.name}", kind)]


@contextlib.contextmanager
def _folding_only_the_convolutions_present(module: torch.fx.GraphModule) -> Iterator[None]:
    """QAT's ``convert_pt2e`` folds BatchNorm into the convolutions before it: torchao matches 4
    convolution kinds (1d, 2d, transposed 1d and 2d) x 12 variants, exporting each pattern afresh, 96
    exports whatever the graph holds (about 50 s on one thread, the bulk of a small QAT job);
    ``prepare_qat_pt2e`` fuses conv-bn for training the same way, over the same 4 kinds. The kinds the
    graph lacks match nothing: they are skipped, the same result in a fraction of the time."""
    from torchao.quantization.pt2e import qat_utils

    originals = {name: getattr(qat_utils, name) for name in ("_fold_conv_bn_qat_helper", "_fuse_conv_bn_qat_helper")}
    present = {getattr(getattr(node.target, "overloadpacket", None), "__name__", None) for node in module.graph.nodes}

    def only_present(helper: Callable) -> Callable:
        def present_kinds(model: torch.fx.GraphModule, conv_fn: Callable, *args: Any, **kwargs: Any) -> Any:
            return helper(model, conv_fn, *args, **kwargs) if conv_fn.__name__ in present else model

        return present_kinds

    for name, helper in originals.items():
        setattr(qat_utils, name, only_present(helper))
    try:
        yield
    finally:
        for name, helper in originals.items():
            setattr(qat_utils, name, helper)


def _drop_unused_state(module: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers the graph no longer reads (the float weights that int8 copies
    replaced): export saves every registered tensor, used or not."""
    module.graph.eliminate_dead_code()
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*module.named_parameters(), *module.named_buffers()]:
        if name not in used:
            delete_attribute(module, name)
    module.recompile()
