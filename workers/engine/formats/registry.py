"""The table of model formats: how the run loads, runs, saves and times a model of each format.

A format module (``torchscript``, ``exported``) holds the work; this table names, for each format
``modelpress.formats`` tells from a file's layout, the functions the run calls. A new format is one
module and one entry here. Which methods a format can run is the methods' registry
(``workers.engine.methods.registry``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from modelpress.formats import EXPORTED, TORCHSCRIPT

from workers.engine.analysis.torchscript_graph import module_types
from workers.engine.errors import UnsupportedModel
from workers.engine.formats import exported
from workers.engine.formats.torchscript import load_model, save_model


@dataclass(frozen=True)
class ModelFormat:
    """How the engine handles one file format: what a method works on, what runs, how it is saved.

    ``load`` gives the form a method takes (a ScriptModule, or an ``ExportedProgram``); ``runnable``
    turns it into what is called on inputs. A method's result is saved in the format it came in.
    """

    name: str
    load: Callable[[str | os.PathLike], Any]
    runnable: Callable[[Any], Any]
    save: Callable[[Any, str | os.PathLike], int]
    timed: Callable[[Any, str, Any], Any]  # (runnable, evaluation.runtime, batch) -> what the latency run calls
    layer_types: Callable[[Any], set[str]]  # the layer types a runnable holds ('Linear', 'Conv2d', 'LSTM', ...)


def _torchscript_timed(model: Any, runtime: str, batch: Any) -> Any:
    if runtime != "eager":
        raise UnsupportedModel(f"evaluation.runtime {runtime!r} applies to torch.export (.pt2) programs; "
                               "a TorchScript model runs in its own interpreter: use 'eager'")
    return model



FORMATS = {
    TORCHSCRIPT: ModelFormat(TORCHSCRIPT, load_model, lambda model: model, save_model,
                             _torchscript_timed, lambda model: set(module_types(model).values())),
    EXPORTED: ModelFormat(EXPORTED, exported.load_program, exported.runnable, exported.save_program,
                          exported.timed_runner, exported.layer_types),
}
