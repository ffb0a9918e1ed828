"""``package: aoti``: a measured ``.pt2`` program compiled by AOTInductor into the job's output file."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workers.engine.errors import UnsupportedModel
from workers.engine.formats.exported import FixedBatch, example_like, fixed_batch, load_program, runnable, user_inputs
from workers.engine.formats.inductor import compile_package, register_inductor_passes, require_compiler
from workers.engine.measure import output_differences


def package_aoti(path: str | os.PathLike, checks: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    """Compile the program at ``path`` with AOTInductor and put the package in its place.

    The package keeps the program's dynamic dimensions, holds kernels built for this machine's CPU
    (instruction set included), and is loaded with ``torch._inductor.aoti_load_package``. Before it
    replaces the program, it is run on the check batches and compared with the program."""
    require_compiler("package 'aoti'")
    register_inductor_passes()
    program = load_program(path)
    size = fixed_batch(program)
    if program.example_inputs is None:  # re-exported results are saved without them; AOTInductor wants some
        program.example_inputs = (tuple(example_like(node.meta["val"]) for node in user_inputs(program)), {})
    directory = Path(tempfile.mkdtemp(prefix=".aoti-", dir=Path(path).parent))  # the package is renamed into place
    try:
        started = time.perf_counter()
        compiled, package = compile_package(program, directory)
        seconds = time.perf_counter() - started
        reference, packaged = runnable(program), FixedBatch(compiled, size) if size else compiled
        with torch.no_grad():
            expected = [reference(*rows) for rows in checks]
            got = [packaged(*rows) for rows in checks]
        differences = [output_differences(e, g) for e, g in zip(expected, got)]
        if any(pairs is None for pairs in differences):
            raise UnsupportedModel(
                "the AOTInductor package's outputs do not have the program's shapes; download the "
                "program instead (package 'program')"
            )
        worst = max(
            (error / (largest or 1.0) for pairs in differences for e, _, error, largest in pairs if e.numel()),
            default=0.0,
        )
        os.replace(package, path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "format": "AOTInductor package (torch._inductor.aoti_compile_and_package)",
        "bytes": Path(path).stat().st_size,
        "compile_s": round(seconds, 2),
        "max_relative_error_to_program": worst,
        "batches_checked": len(checks),
        "load": "torch._inductor.aoti_load_package(path)(*inputs)",
        "built_for": f"{platform.machine()} CPU of the worker (torch {torch.__version__}); the kernels use its "
        "instruction set, so run it on a CPU of the same kind and the same torch version",
        "notes": [
            "the report's size, latency and fidelity are the program's, measured before packaging; "
            "the package's own outputs were compared with the program's on the check batches"
        ],
    }
