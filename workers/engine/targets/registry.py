"""The table of export targets: for each, the module that exports, loads, runs and times it, the
runtime it runs on and the packages it needs. A new target is one module and one entry here.

Torch-free: the API asks ``missing_runtime`` at submit time, the runner ``target_module``.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from workers.engine.targets.common import Artifact, TargetRequest


@dataclass(frozen=True)
class TargetEntry:
    """One target: ``module`` holds ``export(request, directory)``, ``load(path)``, ``run(loaded,
    inputs)`` and ``latency_ms(loaded, inputs, ...)``; ``packages`` are the import names it needs
    to export and run; ``suffix`` ends the artifact's file name. ``torch_free``: whether ``load``
    and ``run`` work in a process without torch (the runner's)."""

    name: str
    module: str
    runtime: str
    packages: tuple[str, ...]
    suffix: str
    torch_free: bool = True


TARGETS = {
    "onnx": TargetEntry("onnx", "workers.engine.targets.onnx", "onnxruntime",
                        ("onnx", "onnxruntime", "onnxscript"), ".onnx"),
    "openvino": TargetEntry("openvino", "workers.engine.targets.openvino", "openvino",
                            ("onnx", "onnxruntime", "onnxscript", "openvino", "nncf"), ".openvino.zip"),
    "executorch": TargetEntry("executorch", "workers.engine.targets.executorch", "executorch",
                              ("executorch", "torchao"), ".pte", torch_free=False),
}


def missing_runtime(name: str) -> str | None:
    """Why target ``name`` cannot run on this machine (an unknown target, a package that is not
    installed), or None when it can. Looks packages up without importing them."""
    entry = TARGETS.get(name)
    if entry is None:
        return f"unknown export target {name!r}; known: {', '.join(sorted(TARGETS))}"
    missing = [package for package in entry.packages if not _importable(package)]
    if missing:
        return (f"export target {name!r} needs the Python package{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}, not installed on the workers")
    return None


def target_module(name: str) -> ModuleType:
    """The target's module, imported now (its runtimes are imported by its functions, when called)."""
    if name not in TARGETS:
        raise KeyError(missing_runtime(name))
    return importlib.import_module(TARGETS[name].module)


def export_target(name: str, request: TargetRequest, directory: Path) -> Artifact:
    """Export the request's model to target ``name`` in ``directory``; raises ``TargetFailed``
    (a ``CompressionError``) when the target cannot express, quantize or run the model."""
    return target_module(name).export(request, Path(directory))


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, a broken __spec__
        return False
