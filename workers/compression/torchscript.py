"""TorchScript graph plumbing shared by the methods.

TorchScript is deprecated in torch 2.14 but still works; every direct use of its
internals lives here (and in ``quantize.py``'s graph rewrite) so a port to
torch.export touches few places.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.jit._recursive import wrap_cpp_module


@contextlib.contextmanager
def quiet_torchscript_warnings() -> Iterator[None]:
    """Silence the 2.14 deprecation warnings of TorchScript and torch.ao.quantization."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*(TorchScript|torch\.jit|deprecated|quantiz).*")
        yield


@dataclass(frozen=True)
class ParameterOwner:
    """Where a tensor lives in the module tree: ``layers.0.linear1`` owns ``layers.0.linear1.weight``."""

    name: str  # qualified parameter name
    module: str  # qualified name of the owning submodule ('' for the root)
    module_type: str  # the owner's Python class name, e.g. 'Linear', 'LSTM'


def parameter_owners(model: torch.jit.ScriptModule) -> dict[int, ParameterOwner]:
    """Map each parameter's storage pointer to its name and owning module type.

    Freezing turns parameters into graph constants that share storage with the
    parameters, so the pointer is how a constant is traced back to its module.
    """
    module_types = {name: _module_type(module) for name, module in model.named_modules()}
    owners: dict[int, ParameterOwner] = {}
    for name, parameter in model.named_parameters():
        module_name = name.rpartition(".")[0]
        owners.setdefault(
            parameter.data_ptr(),
            ParameterOwner(name=name, module=module_name, module_type=module_types.get(module_name, "")),
        )
    return owners


def module_types(model: torch.jit.ScriptModule) -> dict[str, str]:
    """Qualified submodule name -> Python class name."""
    return {name: _module_type(module) for name, module in model.named_modules()}


def matching_pattern(module: str, patterns: list[str]) -> str | None:
    """The first glob pattern naming ``module`` or one of its parents (``layers.0`` covers ``layers.0.fc``)."""
    parts = module.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return next((p for p in patterns if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes)), None)


def freeze_forward(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Inline ``forward`` and turn attributes into constants, without numeric rewrites.

    ``torch.jit.freeze`` would also fold and transpose weights, which breaks the
    mapping from constants back to parameters; the bare pass keeps them intact.
    Freezing keeps only ``forward``: other methods and training-only code are dropped.
    """
    model = model.eval()
    with quiet_torchscript_warnings():
        return wrap_cpp_module(torch._C._freeze_module(model._c))


def tensor_constants(graph: torch._C.Graph) -> Iterator[tuple[torch._C.Node, torch.Tensor]]:
    """Yield each ``prim::Constant`` node that holds a tensor, with the tensor."""
    for node in list(graph.findAllNodes("prim::Constant")):
        output = node.output()
        if output.type().kind() == "TensorType":
            value = output.toIValue()
            if isinstance(value, torch.Tensor):
                yield node, value


def tensor_list_constants(graph: torch._C.Graph) -> Iterator[tuple[torch._C.Node, list[torch.Tensor]]]:
    """Yield each ``prim::Constant`` that holds a list of tensors (an RNN's flat weights)."""
    for node in list(graph.findAllNodes("prim::Constant")):
        output = node.output()
        if output.type().kind() == "ListType" and output.type().getElementType().kind() == "TensorType":
            yield node, list(output.toIValue())


def _module_type(module: torch.nn.Module) -> str:
    return getattr(module, "original_name", type(module).__name__)
