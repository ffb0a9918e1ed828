"""The one place that maps a method name to its engine entry, for each model format.

A method's TorchScript entry is named with its options schema and CLI flag in
``modelpress.spec.REGISTRY`` (``MethodEntry.engine``, ``"module:function"``), so one
``register_method`` call adds a method to the spec, the API, the CLI and the engine. A method that
also compresses torch.export (``.pt2``) programs names that entry here, in ``PROGRAM_METHODS``.
Entries are imported when first used: a job loads only the methods it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from modelpress.formats import EXPORTED
from modelpress.spec import REGISTRY
from workers.engine.errors import UnsupportedModel

Method = Callable[..., tuple[Any, dict[str, Any]]]

# The .pt2 entry of each method that has one.
PROGRAM_METHODS = {
    "quantize": "workers.engine.methods.quantize.exported_qat:quantize_exported",
    "prune": "workers.engine.methods.prune.exported:prune_program",
    "distill": "workers.engine.methods.distill.exported:distill_program",
}


def method_entry(format_name: str, name: str) -> Method:
    """The entry of method ``name`` for models of ``format_name`` (UnsupportedModel when it has none)."""
    if format_name == EXPORTED:
        entry = PROGRAM_METHODS.get(name)
        if entry is None:
            raise UnsupportedModel(
                f"method {name!r} is not available for torch.export (.pt2) programs yet; "
                "upload the model as TorchScript for it"
            )
        return _imported(entry)
    return method_function(name)


def method_function(name: str) -> Method:
    """The TorchScript engine entry a method registered (``modelpress.spec.REGISTRY``)."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise UnsupportedModel(f"method {name!r} is not available in this engine")
    return _imported(entry.engine)


def _imported(entry: str) -> Method:
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)
