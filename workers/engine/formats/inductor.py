"""Compiling with Inductor on the worker's CPU: what ``torch.compile`` and AOTInductor need first,
and compiling a program into an AOTInductor package (for timing and for ``package: aoti``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from workers.engine.errors import UnsupportedModel, summarize_torch_error


def compile_package(program: ExportedProgram, directory: Path) -> tuple[Callable[..., Any], Path]:
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


def require_compiler(what: str) -> None:
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        # Inductor writes C++ kernels for the CPU and compiles them, for torch.compile and AOTInductor alike.
        raise UnsupportedModel(
            f"{what} needs a C++ compiler (g++) on the worker, and none is installed; install g++ in the worker's image"
        )


def register_inductor_passes() -> None:
    """torchao registers inductor's int8 fusion passes (dequantize-linear-quantize into oneDNN qlinear)
    on import of its x86 quantizer; they must exist before the first compile of the process (the
    float program's, timed first), else int8 programs compile to decomposed float ops."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    inductor_config.freezing = True  # constant weights: prepacked (and int8) kernels
    inductor_config.compile_threads = 1  # no compile worker pool inside the job's limits
