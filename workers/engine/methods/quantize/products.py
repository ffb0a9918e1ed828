"""Linear layers written as a product, made ``aten::linear`` so that static int8 reaches them.

torch's graph-mode static quantization (``prepare_jit``/``convert_jit``) matches ``aten::linear`` and
convolutions only. ``transformers``' ``Conv1D`` (every GPT-2 projection) is ``addmm(bias, x, W)``
with ``W`` stored ``[in, out]``, and hand-written layers are ``x @ W (+ b)`` or ``x @ W.t()``: each is
``linear(x, M, b)`` for the ``[out, in]`` matrix ``M`` (``linear_forms`` reads every spelling). Before
static quantization, a module whose ``forward`` multiplies by its *own* weight this way gets that
product replaced by ``aten::linear`` reading the same attribute, and the attribute is stored as ``M``
(transposed once, in every instance of the module's compiled type, whose graph they share). The
model computes what it did; the layer is then a ``Linear`` to the quantizer.

A weight read anywhere else (another use in the graph, another read of the attribute in any method
of any module, or a tensor tied to another parameter) is left alone: transposing it would change what the other reader sees. Those layers stay float, and the
job's warnings name them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from workers.engine.linear_forms import LinearRead, linear_read


def linears_from_products(model: torch.jit.ScriptModule) -> list[str]:
    """Rewrite, in place, every module's own product-spelled linear layer as ``aten::linear``;
    return the names of the modules rewritten (every instance of each rewritten type)."""
    instances: dict[str, list[tuple[str, torch.jit.ScriptModule]]] = defaultdict(list)
    for name, module in model.named_modules():
        if name and "forward" in module._c._method_names():
            instances[module._c._type().qualified_name()].append((name, module))
    shared = _tied_tensors(model)
    reads = _attribute_reads(model)
    rewritten: list[str] = []
    for kind, members in instances.items():
        if _rewrite_type([module for _, module in members], shared, lambda name, k=kind: reads.get((k, name), 0)):
            rewritten += [name for name, _ in members]
    return sorted(rewritten)


def _attribute_reads(model: torch.jit.ScriptModule) -> dict[tuple[str, str], int]:
    """How many ``prim::GetAttr`` nodes read each (compiled type, attribute), over every method graph of
    every type in the model, nested blocks included: a scripted ``self.weight`` written twice, another
    method, or a parent reading ``self.child.weight`` each count."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    seen: set[str] = set()
    for _, module in model.named_modules():
        kind = module._c._type().qualified_name()
        if kind in seen:
            continue
        seen.add(kind)
        for method in module._c._method_names():
            for node in module._c._get_method(method).graph.findAllNodes("prim::GetAttr"):
                owner = node.inputsAt(0).type()
                if isinstance(owner, torch._C.ClassType):
                    counts[(owner.qualified_name(), node.s("name"))] += 1
    return counts


def own_linear_modules(model: torch.jit.ScriptModule) -> set[str]:
    """Modules whose ``forward`` calls ``aten::linear`` on their own weight attribute (``nn.Linear``,
    and what ``linears_from_products`` made): the layers static int8 can quantize."""
    found = set()
    for name, module in model.named_modules():
        if not name or "forward" not in module._c._method_names():
            continue
        graph = module._c._get_method("forward").graph
        for node in graph.findAllNodes("aten::linear"):
            source = node.inputsAt(1).node()
            if source.kind() == "prim::GetAttr" and source.inputsAt(0) == _self(graph):
                found.add(name)
                break
    return found


def _rewrite_type(modules: list[torch.jit.ScriptModule], shared: set[int], reads: Callable[[str], int]) -> bool:
    graph = modules[0]._c._get_method("forward").graph
    owner = _self(graph)

    def shape_of(value: torch._C.Value) -> tuple[int, ...] | None:
        """The one shape an attribute of ``self`` has in every instance, else None."""
        node = value.node()
        if node.kind() != "prim::GetAttr" or node.inputsAt(0) != owner:
            return None
        tensors = [getattr(module, node.s("name"), None) for module in modules]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
            return None
        shapes = {tuple(t.shape) for t in tensors}
        return shapes.pop() if len(shapes) == 1 else None

    changed = False
    for node in [
        *graph.findAllNodes("aten::addmm"),
        *graph.findAllNodes("aten::matmul"),
        *graph.findAllNodes("aten::mm"),
    ]:
        found = linear_read(node, shape_of)
        if found is None:
            continue
        weight, read = found
        name = weight.node().s("name")
        tensors = [getattr(module, name) for module in modules]
        # Read once in the whole model (this product), by nothing else and not tied: then storing it
        # transposed changes no other reader.
        if reads(name) != 1 or not _only_reader(weight, read) or any(t.data_ptr() in shared for t in tensors):
            continue
        if read.transposed:  # stored [in, out]: store M = its transpose, once per instance
            for module, tensor in zip(modules, tensors):
                setattr(module, name, torch.nn.Parameter(tensor.detach().t().contiguous(), tensor.requires_grad))
        _replace_with_linear(graph, weight, read)
        changed = True
    if changed:
        torch._C._jit_pass_dce(graph)
    return changed


def _only_reader(weight: torch._C.Value, read: LinearRead) -> bool:
    """The product (directly, or through one transpose read by nothing else) is the weight's only use."""
    uses = list(weight.uses())
    if len(uses) != 1:
        return False
    user = uses[0].user
    return user == read.node or (len(list(user.output().uses())) == 1 and user.output().uses()[0].user == read.node)


def _replace_with_linear(graph: torch._C.Graph, weight: torch._C.Value, read: LinearRead) -> None:
    last = read.output.node()
    with graph.insert_point_guard(last):
        bias = read.bias if read.bias is not None else graph.insertConstant(None)
        linear = graph.create("aten::linear", [read.input, weight, bias])
        linear.output().setType(read.output.type())
        graph.insertNode(linear)
    # Inserted before ``last``: after every node that computes the input, the weight and the bias.
    read.output.replaceAllUsesWith(linear.output())
    for dead in read.dead:
        if not list(dead.output().uses()):
            dead.destroy()


def _tied_tensors(model: torch.jit.ScriptModule) -> set[int]:
    """Storage of tensors named more than once (tied weights)."""
    seen: dict[int, int] = defaultdict(int)
    for _, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        seen[tensor.data_ptr()] += 1
    return {pointer for pointer, count in seen.items() if count > 1}


def _self(graph: torch._C.Graph) -> torch._C.Value:
    return next(graph.inputs())
