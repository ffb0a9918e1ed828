"""Reading a TorchScript model's intermediate activations: the outputs of its submodules, by name.

Forward hooks do not run on ScriptModules, so a copy of ``forward``'s inlined graph is rewritten to
return the chosen values as extra outputs (as ``torchscript_graph.value_shapes`` reads every
tensor) and run as a function of the same module object: parameters, buffers and the ``training``
flag are the module's own, so gradients reach the weights and BatchNorm statistics update exactly
as in ``forward``. Each value is copied (``aten::clone``) where its module's call ends, so an
in-place op after the call (``ReLU(inplace=True)``, ``out += identity``) does not change it.

Which value a submodule returns is read from where the inliner left each node:
``Node.getModuleHierarchy()`` names the chain of module calls a node came from
(``features(Sequential).3(Conv2d)``). One call is a contiguous run of nodes in the inlined graph;
the tensor defined in the run that a node after it reads (or the graph returns) is the module's
output. Instance names are relative when a module is reached by iterating a ModuleList from its
parent (``0(Linear)`` for ``query.0``): such a chain is anchored by the attribute reads in the run
(``GetAttr[weight]`` of the module ``query.0``). A layer is readable when its call is one run at the
top level of ``forward`` with one tensor output: layers called more than once (a shared ReLU),
inside a loop or a branch, or returning several tensors are not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.engine.torchscript_graph import module_types, quiet_torchscript_warnings

_CALL = re.compile(r"(\w+)\(([^()]*)\)")  # one "instance(Type)" of a module hierarchy


@dataclass(frozen=True)
class Readable:
    """A layer's output in an inlined graph: the value, and the last node of the layer's call."""

    value: torch._C.Value
    end: torch._C.Node


def readable_layers(model: torch.jit.ScriptModule, graph: torch._C.Graph) -> tuple[dict[str, Readable], dict[str, str]]:
    """The submodules of ``model`` whose output can be read in ``graph`` (its inlined ``forward``), in the
    order they run; and why other modules the graph calls cannot be read."""
    types = module_types(model)
    nodes = [node for node in graph.nodes() if node.kind() != "prim::Constant"]
    chains = _call_chains(nodes, _module_values(graph, types), types)
    spans: dict[str, list[int]] = {}
    for index, chain in enumerate(chains):
        for path in chain:
            spans.setdefault(path, [index, index])[1] = index
    position = {node: index for index, node in enumerate(nodes)}
    returned = graph.return_node()
    found: dict[str, Readable] = {}
    refused: dict[str, str] = {}
    for path, (first, last) in spans.items():
        if any(chain and path not in chain for chain in chains[first : last + 1]):
            refused[path] = "it is called more than once"
            continue
        outputs = [
            value
            for node in nodes[first : last + 1]
            if node.kind() != "prim::GetAttr"
            for value in node.outputs()
            if value.type().kind() == "TensorType"
            and any(
                _top(use.user, graph) is returned or position.get(_top(use.user, graph), -1) > last
                for use in value.uses()
            )
        ]
        following = nodes[last + 1] if last + 1 < len(nodes) else None
        if (
            following is not None
            and not chains[last + 1]
            and following.kind() in ("prim::If", "prim::Loop")
            and any(value in outputs for value in following.inputs())
        ):
            refused[path] = "its output may come out of a branch or loop"
        elif len(outputs) != 1:
            refused[path] = f"it returns {len(outputs)} tensors" if outputs else "it returns no tensor of its own"
        else:
            found[path] = Readable(outputs[0], nodes[last])
    return found, refused


def unreadable_reason(name: str, found: Sequence[str], refused: dict[str, str], role: str) -> str:
    """Why ``name`` cannot be read from the ``role`` model (student or teacher), with some names that can."""
    shown = ", ".join(list(found)[:12]) + (f" (and {len(found) - 12} more)" if len(found) > 12 else "")
    why = f"its output cannot be read: {refused[name]}" if name in refused else "no such layer is called in forward"
    return f"the {role} has no readable layer {name!r} ({why}); layers that can be read: {shown or 'none'}"


class LayerReader:
    """``model``'s forward that also returns the outputs of ``layers``: ``reader(*inputs)`` gives
    ``(output, [one tensor per layer])``. Raises KeyError naming the first layer that cannot be read."""

    def __init__(self, model: torch.jit.ScriptModule, layers: Sequence[str]) -> None:
        with quiet_torchscript_warnings():
            graph = model.inlined_graph  # a copy: the model's own graphs are not touched
        found, _ = readable_layers(model, graph)
        missing = [layer for layer in layers if layer not in found]
        if missing:
            raise KeyError(missing[0])
        copies = []
        for layer in layers:
            readable = found[layer]
            copy = graph.create("aten::clone", [readable.value, graph.insertConstant(None)])
            copy.insertAfter(readable.end)
            copy.inputsAt(1).node().moveBefore(copy)
            copy.output().setType(readable.value.type())
            copies.append(copy.output())
        outputs = list(graph.outputs())
        while len(list(graph.outputs())):
            graph.eraseOutput(0)
        pack = graph.create("prim::TupleConstruct", [*outputs, *copies])
        graph.appendNode(pack)
        pack.output().setType(torch._C.TupleType([value.type() for value in [*outputs, *copies]]))
        graph.registerOutput(pack.output())
        graph.lint()
        self.model = model
        self.count = len(outputs)
        self.function = torch._C._create_function_from_graph("forward_with_layer_outputs", graph)

    def __call__(self, *inputs: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        with quiet_torchscript_warnings():
            results = self.function(self.model._c, *inputs)
        return results[0] if self.count == 1 else tuple(results[: self.count]), list(results[self.count :])


# ---------------------------------------------------------------------------- naming nodes by module


def _module_values(graph: torch._C.Graph, types: dict[str, str]) -> dict[torch._C.Value, str]:
    """Values of the graph that are submodules (``prim::GetAttr`` chains from ``self``), with their names."""
    paths: dict[torch._C.Value, str] = {next(graph.inputs()): ""}
    for node in graph.findAllNodes("prim::GetAttr"):
        owner = paths.get(node.inputsAt(0))
        if owner is not None:
            path = f"{owner}.{node.s('name')}".lstrip(".")
            if path in types:
                paths[node.output()] = path
    return paths


def _calls(node: torch._C.Node) -> tuple[tuple[str, str], ...]:
    """The module calls a node of an inlined graph came from: (instance, type) from the outside in."""
    calls = []
    for instance, kind in _CALL.findall(node.getModuleHierarchy()):
        if instance == "UNKNOWN_INSTANCE":  # a function called by the module: still the module's code
            break
        if instance != "SELF":  # a method of the same module
            calls.append((instance, kind.rpartition(".")[2]))
    return tuple(calls)


def _call_chains(
    nodes: list[torch._C.Node], modules: dict[torch._C.Value, str], types: dict[str, str]
) -> list[tuple[str, ...]]:
    """For each node, the qualified names of the modules whose call it belongs to (outermost first);
    empty for the model's own code and for nodes the inliner left without a hierarchy."""
    anchors: dict[tuple[tuple[str, str], ...], str] = {}  # a relative chain -> the module it last named
    chains = []
    for node in nodes:
        calls = _calls(node)
        if calls and node.kind() == "prim::GetAttr" and node.inputsAt(0) in modules:
            owner = modules[node.inputsAt(0)]
            if owner.rpartition(".")[2] == calls[-1][0]:
                anchors[calls] = owner
        chains.append(_resolve(calls, anchors.get(calls), types) if calls else ())
    return chains


def _resolve(calls: tuple[tuple[str, str], ...], anchor: str | None, types: dict[str, str]) -> tuple[str, ...]:
    names = [instance for instance, _ in calls]
    absolute = tuple(".".join(names[:depth]) for depth in range(1, len(names) + 1))
    if all(types.get(path) == kind for path, (_, kind) in zip(absolute, calls)):
        return absolute
    if anchor is None:
        return ()
    parts = anchor.split(".")
    end, chain = len(parts), []
    for instance, kind in reversed(calls):  # the innermost call is the anchor; callers are its ancestors
        while end > 0 and parts[end - 1] != instance:
            end -= 1
        path = ".".join(parts[:end])
        if end == 0 or types.get(path) != kind:
            return ()
        chain.append(path)
        end -= 1
    return tuple(reversed(chain))


def _top(node: torch._C.Node, graph: torch._C.Graph) -> torch._C.Node:
    """The node at the top level of ``graph`` that holds ``node`` (itself, or the branch or loop around it)."""
    while node.owningBlock() is not graph.block():
        node = node.owningBlock().owningNode()
    return node
