"""torch.export programs (``.pt2``): load, save, quantize, prune, and the job's run and report.

The program is compressed as a program: weights are rewritten in the exported state dict or in
the unlifted graph (``ExportedProgram.module()``), and the result is re-exported so plain
``torch.export.load`` runs it. The dynamic dimensions of the uploaded program are kept.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from modelpress.formats import EXPORTED, exported_program_problem, is_exported_program

from workers.engine.formats.torchscript import save_atomically
from workers.engine.errors import InvalidInput, InvalidModel, NothingToPrune, UnsupportedModel, summarize_torch_error
from workers.engine.inputs import Dataset
from workers.engine.measure import count_macs, output_differences, run_model
from workers.engine.methods.quantize.static import SYNTHETIC_WARNING
from workers.engine.analysis.torchscript_graph import matching_pattern, quiet_torchscript_warnings

Progress = Callable[[str, float], None]

# Smallest weight worth quantizing: below this the int8 copy plus its scales saves almost nothing.
MIN_QUANTIZED_ELEMENTS = 1024
_LINEAR = torch.ops.aten.linear.default
_PT2E_TYPES = {torch.ops.aten.linear.default: "Linear", torch.ops.aten.conv2d.default: "Conv2d"}
CALIBRATION_ROWS = 32
CALIBRATION_LIMIT = 256  # rows run through the observers
_PRUNABLE_OPS = {  # op -> the module type it stands for in spec.prune.modules
    torch.ops.aten.linear.default: "Linear",
    torch.ops.aten.conv2d.default: "Conv2d",
    torch.ops.aten.convolution.default: "Conv2d",
}


def load_program(path: str | os.PathLike) -> ExportedProgram:
    """Check the archive again (this process may be the first to see the file), then ``torch.export.load``."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise InvalidModel("the model file is not a .pt2 archive: it has no readable zip directory") from None
    problem = exported_program_problem(path, names) if is_exported_program(names) else "not a torch.export archive"
    if problem is not None:
        raise InvalidModel(problem)
    _register_quantized_operators()
    try:
        # The check above refuses every pickle torch would load with weights_only=False; forcing
        # weights_only keeps a second lock on torch.load should a later torch read more pickles.
        with _weights_only_loads(), open(path, "rb") as handle:
            program = torch.export.load(handle)
    except Exception as error:
        raise InvalidModel(f"the .pt2 program could not be loaded: {summarize_torch_error(error)}") from None
    # The archive's guards_code are strings that every .module() pastes into a function and execs.
    # The check above admits plain size comparisons only; dropping them keeps a second lock: no
    # string of the archive is ever run (the job feeds the program its own data; torch still
    # checks inputs against the program's range constraints, which are numbers).
    program._guards_code = []
    return program


def save_program(program: ExportedProgram, path: str | os.PathLike) -> int:
    """Save atomically (temp name, then rename); return bytes. torch.export.save wants a name ending .pt2."""
    return save_atomically(path, lambda temp_name: torch.export.save(program, temp_name), suffix=".pt2")


def quantize_program(program: ExportedProgram, spec: Mapping[str, Any], data: Dataset,
                     progress: Progress) -> tuple[ExportedProgram, dict[str, Any]]:
    """int8 through PT2E (torchao's x86 quantizer): ``dynamic`` quantizes Linear weights and, per
    batch at run time, their inputs; ``static`` quantizes conv and linear weights and activations
    with ranges calibrated on the examples. ``dtype: float16`` stores Linear weights as float16.

    The converted graph holds int8 weights with ``quantized_decomposed`` (de)quantize ops around
    float ``aten`` ops: eagerly it dequantizes on every call; ``torch.compile`` / AOTInductor fuse
    the patterns into int8 kernels.
    """
    if spec.get("dtype", "qint8") == "float16":
        if spec.get("mode", "dynamic") == "static":
            raise UnsupportedModel("static quantization is int8; drop dtype float16 or use mode dynamic")
        return _float16_weights(program, spec, progress)
    static = spec.get("mode", "dynamic") == "static"
    modules = set(spec.get("modules") or (["Conv2d", "Linear"] if static else ["Linear"]))
    if not modules & set(_PT2E_TYPES.values()):
        raise UnsupportedModel(f"on .pt2 programs int8 covers {', '.join(sorted(set(_PT2E_TYPES.values())))} layers; "
                               "add one of them to quantize.modules")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module = program.module()
    # 7-bit activations unless a static spec says otherwise: oneDNN's int8 kernels on CPUs without
    # VNNI (AVX2) sum u8 x s8 pairs in int16 and saturate with full-range activations; the compiled
    # program then drifts from the program (measured: 16% of the largest output on an MLP).
    reduce_range = bool(spec.get("reduce_range", True))
    quantizer, chosen, skipped = _x86_quantizer(module, modules, list(spec.get("exclude") or []), static, reduce_range)
    recurrent = [layer for layer in _recurrent_layers(module) if layer["type"] in modules or not spec.get("modules")]
    skipped += recurrent
    if not chosen:
        raise UnsupportedModel("no layer of the program can be quantized (" + (", ".join(sorted(
            {s["reason"] for s in skipped})) or f"the program has no {' or '.join(sorted(modules))} op") + ")")
    progress("preparing", 0.1)
    _split_source_partitions(module)
    try:
        prepared = prepare_pt2e(module, quantizer)
    except Exception as error:
        raise UnsupportedModel(f"the x86 quantizer could not annotate the program: {summarize_torch_error(error)}") \
            from None
    fixed = fixed_batch(program)
    rows = fixed or CALIBRATION_ROWS  # a program exported with a fixed batch accepts only that many rows
    limit = min(len(data), CALIBRATION_LIMIT)
    batches = [data.rows(slice(start, start + rows)) for start in range(0, limit - rows + 1 if fixed else limit, rows)]
    if not batches:
        raise InvalidInput(f"the program was exported for batches of exactly {fixed} rows and the data has "
                           f"{len(data)}: upload at least {fixed} rows")
    for index, batch in enumerate(batches if static else batches[:1]):
        run_model(prepared, batch)
        progress("calibrating" if static else "tracing", 0.1 + 0.6 * (index + 1) / len(batches))
    converted = convert_pt2e(prepared)
    _drop_unused_state(converted)
    exported = _reexport(converted, program, data.head(fixed or 2))
    progress("quantizing", 1.0)
    details = {"format": EXPORTED, "mode": "static" if static else "dynamic", "route": "PT2E, torchao X86InductorQuantizer", "reduce_range": reduce_range,
               "quantized": chosen, "left_float": skipped,
               "calibration": {"batches": len(batches), "rows": sum(int(b[0].shape[0]) for b in batches)} if static
               else None,
               "notes": ["int8 weights (per output channel) with quantize/dequantize ops in the graph; run it with "
                         "torch.compile or AOTInductor for int8 kernels (evaluation.runtime), eagerly it dequantizes "
                         "on every call", "loading the program needs `import torchao` first (it registers the "
                         "quantized_decomposed operators)"]}
    if static and data.synthetic:
        details["warnings"] = [SYNTHETIC_WARNING]
    float_weights = sum(layer["weights"] for layer in recurrent)
    int8_weights = sum(entry["weights"] or 0 for entry in chosen)
    if float_weights > int8_weights:
        details.setdefault("warnings", []).append(
            f"most weights stay float: the recurrent layers ({', '.join(layer['module'] or layer['op'] for layer in recurrent)}; "
            f"{float_weights} weights) have no int8 kernel in an exported program, against {int8_weights} int8 "
            "weights; use quantize.dtype float16 to halve them, or upload TorchScript for int8 LSTM/GRU")
    return exported, details


def _float16_weights(program: ExportedProgram, spec: Mapping[str, Any],
                     progress: Progress) -> tuple[ExportedProgram, dict[str, Any]]:
    """Store the weights of every ``aten.linear`` and recurrent op (LSTM, GRU, RNN) as float16, cast
    back to float inside the program."""
    exclude = list(spec.get("exclude") or [])
    modules = set(spec.get("modules") or DYNAMIC_DEFAULT)
    if not modules & {"Linear", *_RECURRENT_OPS.values()}:
        raise UnsupportedModel("on .pt2 programs float16 weights cover Linear, LSTM, GRU and RNN layers; add one "
                               "of them to quantize.modules")
    module = program.module()
    graph = module.graph
    quantized, skipped = [], []
    replaced: set[str] = set()
    for kind, weight_node in _stored_weights(graph, skipped):
        name = weight_node.target
        if name in replaced:
            continue
        weight = _attribute(module, name)
        owner = name.rpartition(".")[0]
        reason = (f"{kind} not selected" if kind not in modules else _quantize_skip_reason(weight, owner, exclude))
        if reason:
            skipped.append({"module": owner, "weight": name, "type": kind, "reason": reason})
            continue
        stored = "_mp_" + name.replace(".", "_") + "_fp16"
        module.register_buffer(stored, weight.detach().to(torch.float16))
        with graph.inserting_before(weight_node):
            cast = graph.call_function(torch.ops.aten._to_copy.default, (graph.get_attr(stored),), {"dtype": weight.dtype})
        weight_node.replace_all_uses_with(cast)
        graph.erase_node(weight_node)
        _delete_attribute(module, name)
        replaced.add(name)
        quantized.append({"module": owner, "weight": name, "type": kind, "dtype": "float16", "shape": list(weight.shape)})
    if not quantized:
        raise UnsupportedModel("no weight of the program could be stored as float16 (" +
                               (", ".join(sorted({s["reason"] for s in skipped}))
                                or "the program has no aten.linear or recurrent op") + ")")
    graph.lint()
    module.recompile()
    progress("quantizing", 1.0)
    return _reexport(module, program, None), {"format": EXPORTED, "mode": "weight-only", "quantized": quantized,
                                              "left_float": skipped, "notes": ["weights are stored in float16"]}


_RECURRENT_OPS = {torch.ops.aten.lstm.input: "LSTM", torch.ops.aten.gru.input: "GRU",
                  torch.ops.aten.rnn_tanh.input: "RNN", torch.ops.aten.rnn_relu.input: "RNN"}
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
                skipped.append({"op": node.name, "type": kind, "reason": "the weight is computed in the graph, not stored"})
            elif weight_node.meta.get("val") is None or weight_node.meta["val"].dim() == 2:  # matrices, not biases
                yield kind, weight_node


def _recurrent_layers(module: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """The recurrent ops of a program's module, named by their module, with their weight counts
    (what dynamic int8 leaves float)."""
    return [{"op": node.name, "module": _module_path(node), "type": _RECURRENT_OPS[node.target],
             "weights": sum(_attribute(module, w.target).numel() for w in node.args[2]
                            if isinstance(w, torch.fx.Node) and w.op == "get_attr"),
             "reason": "no int8 kernel runs an exported recurrent op; use dtype float16 for them (2x smaller), "
                       "or upload TorchScript for int8 LSTM/GRU"}
            for node in module.graph.nodes if node.op == "call_function" and node.target in _RECURRENT_OPS]


def prune_program(program: ExportedProgram, spec: Mapping[str, Any], data: Dataset,
                  progress: Progress) -> tuple[ExportedProgram, dict[str, Any]]:
    """Zero the smallest-magnitude weights of Linear / Conv2d ops in the program's state dict.

    |w| below the ``amount`` quantile (of all chosen weights with scope ``global``, of each layer's
    with ``per_layer``) becomes 0. The graph is unchanged; zeros shrink the file once compressed.
    """
    if spec.get("structured"):
        return _prune_channels(program, spec, data, progress)
    if spec.get("finetune"):
        raise UnsupportedModel("fine-tuning after pruning is not available for .pt2 programs yet; drop 'finetune'")
    amount = float(spec["amount"])
    modules, exclude = set(spec.get("modules") or _PRUNABLE_OPS.values()), list(spec.get("exclude") or [])
    weights: dict[str, torch.Tensor] = {}
    for node in program.graph.nodes:
        kind = _PRUNABLE_OPS.get(node.target) if node.op == "call_function" else None
        if kind is None or kind not in modules or not isinstance(node.args[1], torch.fx.Node):
            continue
        name = program.graph_signature.inputs_to_parameters.get(node.args[1].name)
        if name is not None and not matching_pattern(name.rpartition(".")[0], exclude):
            weights[name] = program.state_dict[name]
    if not weights:
        raise UnsupportedModel(f"the program has no {' or '.join(sorted(modules))} weight to prune")
    if spec.get("scope", "global") == "global":
        threshold = _magnitude_quantile(torch.cat([w.detach().abs().flatten() for w in weights.values()]), amount)
        thresholds = dict.fromkeys(weights, threshold)
    else:
        thresholds = {name: _magnitude_quantile(w.detach().abs().flatten(), amount) for name, w in weights.items()}
    layers = []
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(weight.abs() > thresholds[name])
            layers.append({"weight": name, "sparsity": round(float((weight == 0).float().mean()), 5)})
    progress("pruning", 1.0)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return program, {"format": EXPORTED, "structured": False, "sparsity": round(zeros / total, 5), "layers": layers,
                     "notes": ["zeros are stored as such: the file shrinks once compressed (see deflate_bytes)"]}


def _prune_channels(program: ExportedProgram, spec: Mapping[str, Any], data: Dataset,
                    progress: Progress) -> tuple[ExportedProgram, dict[str, Any]]:
    """Structured pruning of a program: the TorchScript path's channel analysis on a trace of the
    unlifted module, then the sliced (and fine-tuned) tensors copied back by name and re-exported.

    The trace keeps every tensor under its name in ``ExportedProgram.module()`` and sees the same
    aten calls, so each slicing is proven there against the masked reference (``prune.prune``);
    the re-exported program is then checked against the proven trace on the same rows."""
    from workers.engine.methods.prune.torchscript import MASKED_TOLERANCE, check_batches, prune, set_tensor

    fixed = fixed_batch(program)
    if fixed and spec.get("finetune"):
        raise UnsupportedModel(f"the program was exported for batches of exactly {fixed} rows, and fine-tuning "
                               "trains in batches of other sizes: export it with a dynamic batch "
                               "(dynamic_shapes), or drop 'finetune'")
    module = program.module()
    _sizes_as_methods(module)
    example = data.exactly(fixed or 2)
    try:
        with quiet_torchscript_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the guards become constants
            traced = torch.jit.trace(module, example, check_trace=False, strict=False)
    except Exception as error:
        raise UnsupportedModel("structured pruning analyses a trace of the program, and tracing it failed: "
                               f"{summarize_torch_error(error)}") from None
    traced, details = prune(traced, spec, data, progress, fixed_batch=fixed)
    shapes_before = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    with torch.no_grad():
        for name, tensor in traced.state_dict().items():
            set_tensor(module, name, tensor.detach().clone(), requires_grad=_attribute(module, name).requires_grad)
    _follow_sliced_sizes(module, shapes_before)
    exported = _reexport(module, program, example)
    for rows in check_batches(data, fixed):
        with torch.no_grad(), quiet_torchscript_warnings():
            pairs = output_differences(traced(*rows), exported.module()(*rows))
        scale = max((largest for expected, _, _, largest in pairs or [] if expected.numel()), default=0.0) or 1.0
        if pairs is None or any(error > MASKED_TOLERANCE * scale for _, _, error, _ in pairs):
            raise UnsupportedModel("the pruned program, exported again, does not compute what the pruned trace "
                                   "computes (a size the trace could not follow is fixed in the graph); upload "
                                   "the model as TorchScript to prune its channels")
    if "macs" not in details:  # counted on the programs themselves when the trace refused the counter
        batch = data.exactly(fixed or 8)
        details["macs"] = {"before": count_macs(program.module(), batch), "after": count_macs(exported.module(), batch),
                           "batch_shape": list(batch[0].shape), "counted": "convolutions and matrix multiplies "
                           "(torch.utils.flop_counter, FLOPs / 2)"}
        details["notes"] = [note for note in details["notes"] if not note.startswith("multiply-accumulates not counted")]
    details["format"] = EXPORTED
    details["route"] = "channel analysis on a torch.jit.trace of ExportedProgram.module(), tensors copied back, re-exported"
    return exported, details


# Where a size that must follow sliced weights sits in an op's arguments.
_CONV_GROUPS = {torch.ops.aten.conv1d.default: 6, torch.ops.aten.conv2d.default: 6, torch.ops.aten.conv3d.default: 6,
                torch.ops.aten.convolution.default: 8}
_LAYER_NORM = torch.ops.aten.layer_norm.default


def _sizes_as_methods(module: torch.fx.GraphModule) -> None:
    """``aten.sym_size.int(x, d)`` becomes ``x.size(d)``, ``aten.view(x, shape)`` ``x.view(shape)``
    (and reshape, expand): the same values, but the tracer records the methods with the sizes they
    read, and the op calls with the numbers they got, which would fix the batch size of every
    ``view(x, [batch, ...])`` in the trace (a channel shuffle, a flatten written with ``x.size(0)``)
    and fail each slicing's check at other batch sizes."""
    changed = False
    for node in module.graph.nodes:
        method = _AS_METHOD.get(node.target) if node.op == "call_function" else None
        if method is not None and not node.kwargs:
            node.op, node.target = "call_method", method
            changed = True
    if changed:
        module.recompile()


# Ops that take or give sizes, called as the tensor methods the tracer follows (an op overload
# called from Python gets the traced size as a plain number).
_AS_METHOD = {torch.ops.aten.sym_size.int: "size", torch.ops.aten.view.default: "view",
              torch.ops.aten.reshape.default: "reshape", torch.ops.aten.expand.default: "expand"}


def _follow_sliced_sizes(module: torch.fx.GraphModule, shapes_before: dict[str, tuple[int, ...]]) -> None:
    """Rewrite the sizes the graph holds as numbers to fit the sliced weights, as the TorchScript path
    does with expressions (``derive_conv_groups``, ``derive_layer_norm_shapes``): a grouped conv
    whose whole groups were removed gets ``groups * new rows // old rows`` (its weight's first axis
    is groups x per-group channels, transposed or not); a ``layer_norm`` over sliced channels gets
    its weight's new shape as ``normalized_shape``."""
    changed = False
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        position = _CONV_GROUPS.get(node.target)
        if position is not None and len(node.args) > position and isinstance(node.args[position], int) \
                and node.args[position] > 1 and _is_attribute(node.args[1]):
            old_rows, new_rows = shapes_before[node.args[1].target][0], _attribute(module, node.args[1].target).shape[0]
            if new_rows != old_rows:
                groups = node.args[position]
                node.update_arg(position, groups * new_rows // old_rows)
                changed = True
        elif node.target == _LAYER_NORM and len(node.args) > 2 and _is_attribute(node.args[2]):
            shape = list(_attribute(module, node.args[2].target).shape)
            if list(node.args[1]) != shape:
                node.update_arg(1, shape)
                changed = True
    if changed:
        module.recompile()


def _is_attribute(value: Any) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "get_attr"


def distill_program(program: ExportedProgram, spec: Mapping[str, Any], data: Dataset, progress: Progress,
                    student: torch.nn.Module | None = None) -> tuple[ExportedProgram, dict[str, Any]]:
    """Distil the program into a student (an uploaded ``.pt2``'s module, or a torchvision model) and
    export the trained student with the teacher's dynamic axes: a ``.pt2`` in, a ``.pt2`` out.

    Exported graphs are fixed to the mode they were exported in (eval: BatchNorm uses its running
    statistics, dropout is off), so an uploaded ``.pt2`` student trains its weights in that mode."""
    from workers.engine.methods.distill.torchscript import distill
    from workers.engine.methods.prune.torchscript import PRUNABLE_TYPES

    origin = None
    if spec["student"]["source"] == "width":  # cut from the teacher by structured pruning, as for TorchScript
        width = float(spec["student"]["width"])
        try:
            narrowed, pruned = _prune_channels(program, {
                "amount": 1.0 - width, "structured": True, "criterion": "l1", "modules": list(PRUNABLE_TYPES),
                "exclude": None, "finetune": None}, data, lambda stage, fraction: None)
        except NothingToPrune as error:
            raise NothingToPrune(f"no channel group of the teacher can be narrowed for a width student: {error}") \
                from None
        student = runnable(narrowed)
        spec = {**spec, "student": {**spec["student"], "source": "upload"}}
        origin = {"from": "width", "width": width, "groups": pruned["groups"], "left_whole": pruned["left_whole"]}
    trained, details = distill(runnable(program), spec, data, progress, student=student, scripted=False)
    details["format"] = EXPORTED
    if origin is not None:
        details["student"] = origin
    return _reexport(_unwrapped(trained), program, data.exactly(fixed_batch(program) or 2)), details


METHODS = {"quantize": quantize_program, "prune": prune_program, "distill": distill_program}


def timed_runner(module: torch.nn.Module, runtime: str, batch: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    """What the latency run calls: the program's module eagerly, through ``torch.compile`` (inductor,
    with freezing so int8 patterns become int8 kernels), or as a compiled AOTInductor package."""
    if runtime == "eager":
        return module
    _require_compiler(f"evaluation.runtime {runtime!r}")
    _register_inductor_passes()
    if runtime == "compile":
        return torch.compile(module)
    try:
        # Without gradients, as it will run: inductor freezes weights (and fuses int8 patterns) only
        # for a graph exported in inference; one exported with autograd on keeps float ops (2.3x slower).
        with torch.no_grad():
            exported = torch.export.export(module, tuple(batch))
    except Exception as error:
        raise UnsupportedModel(f"AOTInductor could not compile the program: {summarize_torch_error(error)}") from None
    directory = Path(tempfile.mkdtemp(prefix="mp-aoti-"))
    try:
        return _aoti_package(exported, directory)[0]
    finally:  # the loaded package runs from the loader's own extracted copy, not from this file
        shutil.rmtree(directory, ignore_errors=True)


def package_aoti(path: str | os.PathLike, checks: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    """Compile the program at ``path`` with AOTInductor and put the package in its place.

    The package keeps the program's dynamic dimensions, holds kernels built for this machine's CPU
    (instruction set included), and is loaded with ``torch._inductor.aoti_load_package``. Before it
    replaces the program, it is run on the check batches and compared with the program."""
    _require_compiler("package 'aoti'")
    _register_inductor_passes()
    program = load_program(path)
    size = fixed_batch(program)
    if program.example_inputs is None:  # re-exported results are saved without them; AOTInductor wants some
        program.example_inputs = (tuple(_example_like(node.meta["val"]) for node in _user_inputs(program)), {})
    directory = Path(tempfile.mkdtemp(prefix=".aoti-", dir=Path(path).parent))  # the package is renamed into place
    try:
        started = time.perf_counter()
        compiled, package = _aoti_package(program, directory)
        seconds = time.perf_counter() - started
        reference, packaged = runnable(program), FixedBatch(compiled, size) if size else compiled
        with torch.no_grad():
            expected = [reference(*rows) for rows in checks]
            got = [packaged(*rows) for rows in checks]
        differences = [output_differences(e, g) for e, g in zip(expected, got)]
        if any(pairs is None for pairs in differences):
            raise UnsupportedModel("the AOTInductor package's outputs do not have the program's shapes; download the "
                                   "program instead (package 'program')")
        worst = max((error / (largest or 1.0) for pairs in differences for e, _, error, largest in pairs if e.numel()),
                    default=0.0)
        os.replace(package, path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"format": "AOTInductor package (torch._inductor.aoti_compile_and_package)",
            "bytes": Path(path).stat().st_size, "compile_s": round(seconds, 2),
            "max_relative_error_to_program": worst, "batches_checked": len(checks),
            "load": "torch._inductor.aoti_load_package(path)(*inputs)",
            "built_for": f"{platform.machine()} CPU of the worker (torch {torch.__version__}); the kernels use its "
                         "instruction set, so run it on a CPU of the same kind and the same torch version",
            "notes": ["the report's size, latency and fidelity are the program's, measured before packaging; "
                      "the package's own outputs were compared with the program's on the check batches"]}


def _aoti_package(program: ExportedProgram, directory: Path) -> tuple[Callable[..., Any], Path]:
    """Compile ``program`` with AOTInductor into ``directory``/model.pt2 and load it: the loaded
    package and its path. The loader extracts the package into a folder of its own (and removes it
    when the package is freed), so the package runs on once its file and ``directory`` are gone."""
    package = directory / "model.pt2"
    try:
        with torch.no_grad():  # frozen weights: prepacked (and int8) kernels
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
        return torch._inductor.aoti_load_package(str(package)), package
    except Exception as error:
        raise UnsupportedModel(f"AOTInductor could not compile the program: {summarize_torch_error(error)}") from None


# ---------------------------------------------------------------------------- helpers


def _require_compiler(what: str) -> None:
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        # Inductor writes C++ kernels for the CPU and compiles them, for torch.compile and AOTInductor alike.
        raise UnsupportedModel(f"{what} needs a C++ compiler (g++) on the worker, and none is installed; "
                               "install g++ in the worker's image")


def _register_inductor_passes() -> None:
    """torchao registers inductor's int8 fusion passes (dequantize-linear-quantize into oneDNN qlinear)
    on import of its x86 quantizer; they must exist before the first compile of the process (the
    float program's, timed first), else int8 programs compile to decomposed float ops."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    inductor_config.freezing = True  # constant weights: prepacked (and int8) kernels
    inductor_config.compile_threads = 1  # no compile worker pool inside the job's limits


def _register_quantized_operators() -> None:
    """PT2E-quantized programs call ``quantized_decomposed`` operators, which torch 2.14 no longer
    defines: torchao registers them on import (a program loads only once they exist)."""
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _quantize_skip_reason(weight: torch.Tensor, owner: str, exclude: list[str]) -> str | None:
    pattern = matching_pattern(owner, exclude)
    if pattern:
        return f"excluded by {pattern!r}"
    if not weight.is_floating_point() or weight.dim() != 2:
        return "not a 2-D float weight"
    if weight.numel() < MIN_QUANTIZED_ELEMENTS:
        return f"fewer than {MIN_QUANTIZED_ELEMENTS} weights"
    return None


def _example_like(fake: torch.Tensor) -> torch.Tensor:
    """A real tensor of a placeholder's dtype and shape (symbolic sizes at their hint, 2 if none)."""
    shape = [size if isinstance(size, int) else (size.node.hint or 2) for size in fake.shape]
    if fake.is_floating_point():
        return torch.randn(shape, dtype=fake.dtype)
    return torch.zeros(shape, dtype=fake.dtype)


def _x86_quantizer(module: torch.nn.Module, modules: set[str], exclude: list[str], static: bool, reduce_range: bool):
    """The x86 quantizer set for ``modules`` (by op) minus ``exclude`` (by module path); what it covers."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    config = x86.get_default_x86_inductor_quantization_config(is_dynamic=not static, reduce_range=reduce_range)
    quantizer = x86.X86InductorQuantizer()
    chosen, skipped, excluded = [], [], set()
    for node in module.graph.nodes:
        kind = _PT2E_TYPES.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        owner = _module_path(node)
        pattern = matching_pattern(owner, exclude)
        if kind not in modules or (not static and kind != "Linear"):
            skipped.append({"op": node.name, "module": owner, "reason": f"{kind} not selected" if kind not in modules
                            else "dynamic int8 covers Linear (use mode static for convolutions)"})
        elif pattern:
            skipped.append({"op": node.name, "module": owner, "reason": f"excluded by {pattern!r}"})
            excluded.add(owner)
        else:
            weight = node.args[1].target if _is_attribute(node.args[1]) else None
            chosen.append({"op": node.name, "module": owner, "type": kind,
                           "weights": _attribute(module, weight).numel() if weight else None})
    if static and modules >= {"Conv2d", "Linear"}:
        quantizer.set_global(config)
    else:
        for kind, op in (("Linear", torch.nn.functional.linear), ("Conv2d", torch.nn.functional.conv2d)):
            if kind in modules and (static or kind == "Linear"):
                quantizer.set_function_type_qconfig(op, config)
    for owner in excluded:
        quantizer.set_module_name_qconfig(owner, None)
    return quantizer, chosen, skipped


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


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


def _drop_unused_state(module: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers the graph no longer reads (the float weights that int8 copies
    replaced): export saves every registered tensor, used or not."""
    module.graph.eliminate_dead_code()
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*module.named_parameters(), *module.named_buffers()]:
        if name not in used:
            _delete_attribute(module, name)
    module.recompile()


def _attribute(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _delete_attribute(module: torch.nn.Module, name: str) -> None:
    owner, _, leaf = name.rpartition(".")
    delattr(module.get_submodule(owner) if owner else module, leaf)


class FixedBatch(torch.nn.Module):
    """A program exported for batches of exactly ``size`` rows, callable on any number of rows: the
    batch is cut into ``size``-row chunks (the last padded with copies of its first row), and the
    chunks' outputs are concatenated with the padding dropped. Measuring, fidelity, accuracy and
    distillation then work on the user's data as it comes; gradients flow through the chunks.
    ``module`` may be any callable (a loaded AOTInductor package): only a module is a submodule."""

    def __init__(self, module: Callable[..., Any], size: int) -> None:
        super().__init__()
        self.module, self.size = module, size

    def forward(self, *inputs: torch.Tensor) -> Any:
        rows = int(inputs[0].shape[0])
        if rows == self.size:
            return self.module(*inputs)
        outputs, spec = [], None
        for start in range(0, rows, self.size):
            chunk = [t[start:start + self.size] for t in inputs]
            kept = int(chunk[0].shape[0])
            if kept < self.size:
                chunk = [torch.cat([t, t[:1].expand(self.size - kept, *t.shape[1:])]) for t in chunk]
            leaves, spec = torch.utils._pytree.tree_flatten(self.module(*chunk))
            outputs.append([leaf[:kept] if isinstance(leaf, torch.Tensor) and leaf.dim() else leaf for leaf in leaves])
        joined = [torch.cat(column) if isinstance(column[0], torch.Tensor) and column[0].dim() else column[0]
                  for column in zip(*outputs)]
        return torch.utils._pytree.tree_unflatten(joined, spec)


def runnable(program: ExportedProgram) -> torch.nn.Module:
    """What the engine calls on inputs: the unlifted module, adapted to any batch size when the
    program was exported for one batch size only."""
    size = fixed_batch(program)
    return FixedBatch(program.module(), size) if size else program.module()


def layer_types(module: torch.nn.Module) -> set[str]:
    """The layer types a program's module calls, by the module class that made each op
    (``nn_module_stack``), and by op for graphs without it (``aten.linear`` is a Linear)."""
    types = set()
    for node in _unwrapped(module).graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            kind = list(stack.values())[-1][1]
            types.add((kind if isinstance(kind, str) else kind.__qualname__).rpartition(".")[2])
        if node.target in _PRUNABLE_OPS:
            types.add(_PRUNABLE_OPS[node.target])
    return types


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, FixedBatch) else module


def fixed_batch(program: ExportedProgram) -> int | None:
    """The batch size a program was exported for, when its first input's first dimension is a
    constant (``torch.export`` without ``dynamic_shapes``); None when that dimension is symbolic."""
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            value = program.graph.find_nodes(op="placeholder", target=spec.arg.name)[0].meta.get("val")
            shape = getattr(value, "shape", None)
            return shape[0] if shape and isinstance(shape[0], int) else None
    return None


def _reexport(module: torch.nn.Module, original: ExportedProgram, batch: tuple[torch.Tensor, ...] | None
              ) -> ExportedProgram:
    """Export the rewritten module again, keeping the dimensions the original program left dynamic.

    ``batch`` None: the original's own example values (its placeholders' shapes, as fakes show them)."""
    inputs = _user_inputs(original)
    dynamic = tuple({axis: Dim.DYNAMIC for axis, size in enumerate(node.meta["val"].shape)
                     if isinstance(size, torch.SymInt)} or None for node in inputs)
    if batch is None:
        batch = tuple(_example_like(node.meta["val"]) for node in inputs)
    try:
        exported = torch.export.export(module, tuple(batch), dynamic_shapes=dynamic if any(dynamic) else None)
    except Exception as error:
        raise UnsupportedModel(f"the compressed program could not be exported again: {summarize_torch_error(error)}") \
            from None
    # Otherwise saved as data/sample_inputs: rows of the user's data in every download, and a
    # quarter of a small program's file.
    exported.example_inputs = None
    return exported


def _user_inputs(program: ExportedProgram) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.op == "placeholder"
            and node.name in program.graph_signature.user_inputs]


def _magnitude_quantile(magnitudes: torch.Tensor, amount: float) -> float:
    """The magnitude below which ``amount`` of the values lie (kthvalue: exact, no sort of a copy)."""
    k = int(round(amount * magnitudes.numel()))
    if k <= 0:
        return -1.0
    return float(magnitudes.kthvalue(k).values)


__all__ = ["load_program", "save_program", "quantize_program", "prune_program", "distill_program", "timed_runner"]
