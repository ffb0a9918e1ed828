"""Export targets: the names a spec may ask for, the file each artifact is served as, and whether this
install has the runtime that makes and runs it.

A job's main result stays in the upload's format; each target in ``spec.targets`` adds one artifact
of the same compressed model for another runtime (``workers/engine/targets/`` makes and times it).
The API refuses a target whose runtime is not installed (422 naming it); API and workers run from
the same install (``make run``, the images), so the check made here holds for the worker too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    file_name: str  # under output/ in the job's process; the download's file name
    media_type: str
    format: str  # what the file is
    runtime: str  # what runs it (and times it in the job)
    packages: tuple[str, ...]  # import names the export and the runtime need


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            "onnx",
            "model.onnx",
            "application/octet-stream",
            "onnx",
            "onnxruntime",
            ("onnx", "onnxruntime", "onnxscript"),
        ),
        # OpenVINO converts the float ONNX file and NNCF quantizes it; ExecuTorch quantizes by torchao's PT2E.
        Target(
            "openvino",
            "model.openvino.zip",
            "application/zip",
            "openvino-ir",
            "openvino",
            ("onnx", "onnxruntime", "onnxscript", "openvino", "nncf"),
        ),
        Target(
            "executorch",
            "model.pte",
            "application/octet-stream",
            "executorch-pte",
            "executorch",
            ("executorch", "torchao"),
        ),
    )
}


def missing_runtime(name: str) -> str | None:
    """Why target ``name`` cannot be made on this install (an unknown name, a package missing), or None.
    Looks the packages up without importing them."""
    target = TARGETS.get(name)
    if target is None:
        return f"unknown export target {name!r}; known: {', '.join(TARGETS)}"
    missing = [package for package in target.packages if _absent(package)]
    if missing:
        return (
            f"the {name} target needs {', '.join(missing)}, which this service does not have installed "
            f"(install them on the workers and the API, or drop '{name}')"
        )
    return None


def _absent(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True
