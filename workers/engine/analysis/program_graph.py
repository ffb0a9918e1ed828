"""Reading and editing the graph of a torch.export program's module (``ExportedProgram.module()``).

Tensors by dotted name, and the module an op came from (``nn_module_stack``): shared by the ``.pt2``
format and the methods that rewrite programs.
"""

from __future__ import annotations

from typing import Any

import torch


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def attribute(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def delete_attribute(module: torch.nn.Module, name: str) -> None:
    owner, _, leaf = name.rpartition(".")
    delattr(module.get_submodule(owner) if owner else module, leaf)


def is_attribute(value: Any) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "get_attr"
