"""TorchScript models (``.pt``): load (with readable errors for bad files), save atomically, copy, run and time.

Their operator checks are in ``program_check``."""

from __future__ import annotations

import copy
import io
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers.engine.errors import InvalidModel, UnsupportedModel, summarize_torch_error
from workers.engine.torchscript_graph import module_types, quiet_torchscript_warnings

_EXPORT_HINT = (
    "export TorchScript with torch.jit.script(model).save('model.pt') "
    "(or torch.jit.trace(model, example).save('model.pt'))"
)


def load_model(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a TorchScript file on the CPU in eval mode, or raise ``InvalidModel``."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise InvalidModel("the model file is empty")
    if not zipfile.is_zipfile(path):
        raise InvalidModel(
            "the model file is not a TorchScript archive: it has no zip directory, so it is "
            f"truncated or is not a TorchScript model at all; {_EXPORT_HINT}"
        )
    try:
        with quiet_torchscript_warnings():
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError with C++ traces
        raise InvalidModel(_explain_load_error(error)) from None
    model.eval()
    return model


def save_model(model: torch.jit.ScriptModule, path: str | os.PathLike) -> int:
    """Save atomically (temp name, then rename) so a reader never sees half a file; return bytes."""

    def write(temp_name: str) -> None:
        with quiet_torchscript_warnings():
            torch.jit.save(model, temp_name)

    return save_atomically(path, write, suffix=".tmp")


def runnable(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """What the engine calls on inputs: the ScriptModule itself."""
    return model


def timed_runner(model: Any, runtime: str, batch: Any) -> Any:
    """What the latency run calls: the model itself (``eager``, the only runtime TorchScript has)."""
    if runtime != "eager":
        raise UnsupportedModel(
            f"evaluation.runtime {runtime!r} applies to torch.export (.pt2) programs; "
            "a TorchScript model runs in its own interpreter: use 'eager'"
        )
    return model


def layer_types(model: torch.jit.ScriptModule) -> set[str]:
    """The layer types a model holds ('Linear', 'Conv2d', 'LSTM', ...)."""
    return set(module_types(model).values())


def save_atomically(path: str | os.PathLike, write: Callable[[str], None], suffix: str) -> int:
    """``write(temp_name)`` next to ``path``, then rename it into place; return bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=suffix)
    os.close(fd)
    try:
        write(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def clone_model(model: torch.jit.ScriptModule, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """An independent copy on ``device``.

    Why not the obvious calls: copy.deepcopy of a ScriptModule yields non-leaf parameters that
    optimisers refuse, and ScriptModule.to("cuda") left some weights on the CPU (torch 2.11, seen
    on an H100); a reload with map_location moves every tensor.
    """
    if not isinstance(model, torch.jit.ScriptModule):  # an eager module, or an exported program's module
        return set_training(copy.deepcopy(model).to(device), model.training)
    buffer = io.BytesIO()
    with quiet_torchscript_warnings():
        torch.jit.save(model, buffer)
        buffer.seek(0)
        copied = torch.jit.load(buffer, map_location=device)
    return copied.train(model.training)


def set_training(model: torch.nn.Module, mode: bool) -> torch.nn.Module:
    """``model.train(mode)``; an exported program's module refuses it (its graph is fixed to the mode it
    was exported in, eval for uploads: BatchNorm statistics stay, dropout is off) and is left as it is."""
    try:
        return model.train(mode)
    except NotImplementedError:
        return model


def _explain_load_error(error: Exception) -> str:
    message = str(error)
    if "constants.pkl" in message:
        return (
            "the file is a zip archive without TorchScript code: probably a torch.save() "
            f"checkpoint or state_dict rather than a TorchScript model; {_EXPORT_HINT}"
        )
    if "central directory" in message or "file not found" in message or "failed reading" in message:
        return "the TorchScript archive is damaged or truncated; upload the complete file again"
    return f"the model could not be loaded as TorchScript: {summarize_torch_error(error)}"
