"""The table of export targets: for each, the module that exports, loads, runs and times it. A new target is one module, one entry here and one in
``modelpress.targets`` (its file name, runtime and packages, which the API reads too).

Torch-free: the API asks ``missing_runtime`` at submit time, the runner ``target_module``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from modelpress.targets import TARGETS as SHARED, Target, missing_runtime
from workers.engine.targets.common import Artifact, TargetRequest


@dataclass(frozen=True)
class TargetEntry:
    """The engine's half of one target: ``module`` holds ``export(request, directory)``, ``load(path)``,
    ``run(loaded, inputs)`` and ``latency_ms(loaded, inputs, ...)``, which work in a process without
    torch too (the runner's; ExecuTorch's through its C++ runtime, ``make pte-runner``). The rest (file name, runtime, the
    packages it needs) is ``modelpress.targets.TARGETS``, which the API reads too."""

    name: str
    module: str

    @property
    def facts(self) -> Target:
        return SHARED[self.name]

    @property
    def suffix(self) -> str:
        return self.facts.file_name.removeprefix("model")


TARGETS = {
    "onnx": TargetEntry("onnx", "workers.engine.targets.onnx"),
    "openvino": TargetEntry("openvino", "workers.engine.targets.openvino"),
    "executorch": TargetEntry("executorch", "workers.engine.targets.executorch"),
}
assert set(TARGETS) == set(SHARED), "every target named in modelpress.targets has an engine module here"


def target_module(name: str) -> ModuleType:
    """The target's module, imported now (its runtimes are imported by its functions, when called)."""
    if name not in TARGETS:
        raise KeyError(missing_runtime(name))
    return importlib.import_module(TARGETS[name].module)


def export_target(name: str, request: TargetRequest, directory: Path) -> Artifact:
    """Export the request's model to target ``name`` in ``directory``; raises ``TargetFailed``
    (a ``CompressionError``) when the target cannot express, quantize or run the model."""
    return target_module(name).export(request, Path(directory))


__all__ = ["TARGETS", "TargetEntry", "export_target", "missing_runtime", "target_module"]
