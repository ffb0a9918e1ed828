"""Refuse a loaded TorchScript model whose graphs call an operator the policy refuses.

The policy (which operators, and why) is ``modelpress.operator_policy``, shared with the API's
scan of the archive's code at submit. This is the engine's half: every graph of every method of
every submodule of the loaded model, with calls inlined, before ``forward`` ever runs; the job
process runs it. It only names the operator; it never echoes what a model might have read.
"""

from __future__ import annotations

from typing import Any

from modelpress.operator_policy import HINT, refusal
from workers.engine.errors import UnsafeModel


def check_module(module: Any) -> None:
    """Raise ``UnsafeModel`` naming the first refused operator in any method graph of ``module``."""
    import torch

    for name, submodule in module.named_modules():
        scripted = getattr(submodule, "_c", None)
        if scripted is None:
            continue
        for method_name in scripted._method_names():
            graph = scripted._get_method(method_name).graph.copy()
            torch._C._jit_pass_inline(graph)  # calls into functions, classes and submodules become visible
            op = _first_refused(graph.nodes())
            if op is not None:
                where = f"{name}.{method_name}" if name else method_name
                raise UnsafeModel(f"the model's {where} calls {op}: it {refusal(op)}; {HINT}")


def _first_refused(nodes: Any) -> str | None:
    for node in nodes:
        if refusal(node.kind()):
            return node.kind()
        for block in node.blocks():
            found = _first_refused(block.nodes())
            if found:
                return found
    return None
