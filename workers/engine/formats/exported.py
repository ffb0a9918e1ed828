"""torch.export programs (``.pt2``): load (with the archive's checks), save, run at any batch size, time.

A method compresses a program as a program (``methods/*/exported.py``): weights are rewritten in
the exported state dict or in the unlifted graph (``ExportedProgram.module()``), and the result is
re-exported (``reexport``) so plain ``torch.export.load`` runs it, with the dynamic dimensions of the
uploaded program kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from modelpress.archive import MAX_COMPRESSION_RATIO
from modelpress.formats import exported_program_problem, is_exported_program
from workers.engine.errors import InvalidModel, UnsupportedModel, summarize_torch_error
from workers.engine.formats.inductor import compile_package, register_inductor_passes, require_compiler
from workers.engine.formats.torchscript import save_atomically

LAYER_OPS = {  # op -> the module type it stands for in spec.prune.modules
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


# The program's graph and configs are JSON entries that torch.export.save stores uncompressed: 0.5 MB for a
# 4-layer ViT, 0.04x of its int8 program. Deflated (torch.export.load reads deflated entries) when that
# saves a worthwhile share, and only where the ratio stays under the bound uploads are held to
# (modelpress.archive.MAX_COMPRESSION_RATIO, 50; a graph deflates about 26x), so a result uploaded again
# as a model is accepted; a faster, weaker level is tried when the default one packs too tightly.
_DEFLATE_MAX_RATIO = MAX_COMPRESSION_RATIO * 0.8
_DEFLATE_MIN_SAVING = 16 << 10  # bytes, and at least 0.5% of the archive: else no rewrite


def save_program(program: ExportedProgram, path: str | os.PathLike) -> int:
    """Save atomically (temp name, then rename); return bytes. torch.export.save wants a name ending .pt2."""

    def write(temp_name: str) -> None:
        torch.export.save(program, temp_name)
        deflate_metadata(Path(temp_name))

    return save_atomically(path, write, suffix=".pt2")


def deflate_metadata(path: Path) -> int:
    """Rewrite the archive at ``path`` with its large JSON entries deflated; return the bytes saved (0: left as is)."""
    with zipfile.ZipFile(path) as source:
        packed: dict[str, bytes] = {}
        levels: dict[str, int] = {}
        for info in source.infolist():
            if info.filename.endswith(".json") and info.compress_type == zipfile.ZIP_STORED and info.file_size > 4096:
                data = source.read(info)
                for level in (6, 1):
                    squeezer = zlib.compressobj(level, zlib.DEFLATED, -15)
                    size = len(squeezer.compress(data) + squeezer.flush())
                    if size * _DEFLATE_MAX_RATIO >= len(data):
                        packed[info.filename], levels[info.filename] = data, level
                        break
        saving = sum(len(data) for data in packed.values()) * 0.9  # (estimate: only worth a rewrite if large)
        if not packed or saving < max(_DEFLATE_MIN_SAVING, path.stat().st_size / 200):
            return 0
        rewritten = path.with_name(path.name + ".deflating")
        try:
            with zipfile.ZipFile(rewritten, "w", allowZip64=True) as target:
                for info in source.infolist():
                    if info.filename in packed:
                        target.writestr(
                            info.filename,
                            packed[info.filename],
                            compress_type=zipfile.ZIP_DEFLATED,
                            compresslevel=levels[info.filename],
                        )
                        continue
                    entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                    with (
                        source.open(info) as reading,
                        target.open(entry, "w", force_zip64=info.file_size >= 1 << 31) as writing,
                    ):
                        shutil.copyfileobj(reading, writing, 1 << 20)
        except BaseException:
            rewritten.unlink(missing_ok=True)
            raise
    before = path.stat().st_size
    os.replace(rewritten, path)
    return before - path.stat().st_size


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
            chunk = [t[start : start + self.size] for t in inputs]
            kept = int(chunk[0].shape[0])
            if kept < self.size:
                chunk = [torch.cat([t, t[:1].expand(self.size - kept, *t.shape[1:])]) for t in chunk]
            leaves, spec = torch.utils._pytree.tree_flatten(self.module(*chunk))
            outputs.append([leaf[:kept] if isinstance(leaf, torch.Tensor) and leaf.dim() else leaf for leaf in leaves])
        joined = [
            torch.cat(column) if isinstance(column[0], torch.Tensor) and column[0].dim() else column[0]
            for column in zip(*outputs)
        ]
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
    for node in unwrapped(module).graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            kind = list(stack.values())[-1][1]
            types.add((kind if isinstance(kind, str) else kind.__qualname__).rpartition(".")[2])
        if node.target in LAYER_OPS:
            types.add(LAYER_OPS[node.target])
    return types


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
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


def timed_runner(module: torch.nn.Module, runtime: str, batch: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    """What the latency run calls: the program's module eagerly, through ``torch.compile`` (inductor,
    with freezing so int8 patterns become int8 kernels), or as a compiled AOTInductor package."""
    if runtime == "eager":
        return module
    require_compiler(f"evaluation.runtime {runtime!r}")
    register_inductor_passes()
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
        return compile_package(exported, directory)[0]
    finally:  # the loaded package runs from the loader's own extracted copy, not from this file
        shutil.rmtree(directory, ignore_errors=True)


def reexport(
    module: torch.nn.Module, original: ExportedProgram, batch: tuple[torch.Tensor, ...] | None
) -> ExportedProgram:
    """Export the rewritten module again, keeping the dimensions the original program left dynamic.

    ``batch`` None: the original's own example values (its placeholders' shapes, as fakes show them)."""
    inputs = user_inputs(original)
    dynamic = tuple(
        {axis: Dim.DYNAMIC for axis, size in enumerate(node.meta["val"].shape) if isinstance(size, torch.SymInt)}
        or None
        for node in inputs
    )
    if batch is None:
        batch = tuple(example_like(node.meta["val"]) for node in inputs)
    try:
        exported = torch.export.export(module, tuple(batch), dynamic_shapes=dynamic if any(dynamic) else None)
    except Exception as error:
        raise UnsupportedModel(
            f"the compressed program could not be exported again: {summarize_torch_error(error)}"
        ) from None
    # Otherwise saved as data/sample_inputs: rows of the user's data in every download, and a
    # quarter of a small program's file.
    exported.example_inputs = None
    return exported


def user_inputs(program: ExportedProgram) -> list[torch.fx.Node]:
    return [
        node
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]


def example_like(fake: torch.Tensor) -> torch.Tensor:
    """A real tensor of a placeholder's dtype and shape (symbolic sizes at their hint, 2 if none)."""
    shape = [size if isinstance(size, int) else (size.node.hint or 2) for size in fake.shape]
    if fake.is_floating_point():
        return torch.randn(shape, dtype=fake.dtype)
    return torch.zeros(shape, dtype=fake.dtype)


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


__all__ = ["fixed_batch", "load_program", "reexport", "runnable", "save_program", "timed_runner"]
