"""The table of model formats: how the run loads, runs, saves and times a model of each format.

A format module (``torchscript``, ``exported``) holds the work; this table names, for each format
``modelpress.formats`` tells from a file's layout, the functions the run calls. A new format is one
module and one entry here. Which methods a format can run is the methods' registry
(``workers.engine.methods.registry``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelpress.formats import EXPORTED, TORCHSCRIPT
from workers.engine.formats import exported, torchscript


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


FORMATS = {
    TORCHSCRIPT: ModelFormat(
        TORCHSCRIPT,
        torchscript.load_model,
        torchscript.runnable,
        torchscript.save_model,
        torchscript.timed_runner,
        torchscript.layer_types,
    ),
    EXPORTED: ModelFormat(
        EXPORTED,
        exported.load_program,
        exported.runnable,
        exported.save_program,
        exported.timed_runner,
        exported.layer_types,
    ),
}
