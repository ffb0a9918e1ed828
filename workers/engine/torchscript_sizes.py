"""TorchScript graph rewrites that turn sizes compiled in as constants into sizes computed from the
tensors (a grouped conv's ``groups``, a layer norm's shape, a reshape's sizes), so a model stays
right once structured pruning slices its channels. Part of the TorchScript plumbing of
``torchscript_graph`` (a port to torch.export touches these two modules).
"""

from __future__ import annotations

import torch

# Convolution ops and the position of their ``groups`` argument.
CONVOLUTION_GROUPS_ARGUMENT = {
    "aten::conv1d": 6,
    "aten::conv2d": 6,
    "aten::conv3d": 6,
    "aten::_convolution": 8,
    "aten::convolution": 8,
}


def derive_conv_groups(model: torch.jit.ScriptModule) -> bool:
    """Make grouped convolutions of ``model`` compute ``groups`` as ``input.size(1) // weight.size(1)``.

    ``nn.Conv2d`` compiles ``groups`` into the graph as a constant, and modules of one type share
    one graph, so a depthwise conv cannot get a smaller constant when its channels are removed.
    The expression is what ``groups`` means for any conv, so it is exact before pruning and stays
    right after removing whole groups. Returns whether a graph changed: the caller must then
    reload the model (save and load) so no cached execution plan keeps the constant.
    """
    rewritten = False
    for _, module in model.named_modules():
        for method_name in module._c._method_names():
            graph = module._c._get_method(method_name).graph
            for kind, position in CONVOLUTION_GROUPS_ARGUMENT.items():
                for node in graph.findAllNodes(kind):
                    groups = node.inputsAt(position)
                    if groups.node().kind() != "prim::Constant" or groups.toIValue() == 1:
                        continue
                    if position == 8 and node.inputsAt(6).toIValue():
                        continue  # transposed: groups is not input channels / weight.size(1)
                    with graph.insert_point_guard(node):
                        one = graph.insertConstant(1)
                        channels = _insert(graph, "aten::size", [node.inputsAt(0), one])
                        per_group = _insert(graph, "aten::size", [node.inputsAt(1), one])
                        derived = _insert(graph, "aten::floordiv", [channels, per_group])
                    node.replaceInput(position, derived)
                    rewritten = True
    return rewritten


def _insert(graph: torch._C.Graph, kind: str, inputs: list[torch._C.Value]) -> torch._C.Value:
    node = graph.insertNode(graph.create(kind, inputs))
    return node.output().setType(torch._C.IntType.get())


def derive_layer_norm_shapes(model: torch.jit.ScriptModule) -> bool:
    """Make one-dimensional layer norms of ``model`` normalise ``[input.size(-1)]`` instead of a constant.

    ``nn.LayerNorm`` compiles ``normalized_shape`` into the graph (``__constants__``), shared by
    every module of its type, as ``groups`` is for convs. ``[input.size(-1)]`` is what a
    one-dimensional ``normalized_shape`` must equal, so it is exact before pruning and after.
    The module's graph calls ``F.layer_norm`` (``prim::CallFunction``); a traced one calls
    ``aten::layer_norm``. Returns whether a graph changed: the caller must then reload the model.
    """
    rewritten = False
    for _, module in model.named_modules():
        for method_name in module._c._method_names():
            graph = module._c._get_method(method_name).graph
            for node in [*graph.findAllNodes("aten::layer_norm"), *graph.findAllNodes("prim::CallFunction")]:
                first = 0 if node.kind() == "aten::layer_norm" else 1
                if first and _called_function(node) != "layer_norm":
                    continue
                shape = node.inputsAt(first + 1)
                if not _one_constant_int(shape):
                    continue
                with graph.insert_point_guard(node):
                    last = _insert(graph, "aten::size", [node.inputsAt(first), graph.insertConstant(-1)])
                    derived = graph.insertNode(graph.create("prim::ListConstruct", [last])).output()
                    derived.setType(torch._C.ListType.ofInts())
                node.replaceInput(first + 1, derived)
                rewritten = True
    return rewritten


def derive_reshape_sizes(model: torch.jit.ScriptModule) -> bool:
    """Let sizes compiled into reshapes follow pruned channels: in a ``view``/``reshape`` whose size
    list has no ``-1`` and one literal entry above 1, that entry becomes ``-1`` (``transformers``'
    ``Conv1D`` views its output as ``[batch, tokens, nf]``); an ``aten::split`` into ``n`` unpacked
    pieces of a literal size ``s`` splits by ``(x.size(dim) + n - 1) // n`` (GPT-2's fused q/k/v).

    ``-1`` is inferred as what the literal was, and ``ceil(L / n)`` equals ``s`` whenever the pieces
    were of equal size: the caller checks that the rewritten model still computes the same outputs.
    Returns whether a graph changed: the caller must then reload the model.
    """
    rewritten = False
    for _, module in model.named_modules():
        for method_name in module._c._method_names():
            graph = module._c._get_method(method_name).graph
            for node in [*graph.findAllNodes("aten::view"), *graph.findAllNodes("aten::reshape")]:
                sizes = node.inputsAt(1).node()
                if sizes.kind() != "prim::ListConstruct" or len(list(sizes.output().uses())) != 1:
                    continue
                literal = [
                    i
                    for i, v in enumerate(sizes.inputs())
                    if v.node().kind() == "prim::Constant"
                    and isinstance(v.toIValue(), int)
                    and (v.toIValue() > 1 or v.toIValue() == -1)
                ]
                if len(literal) == 1 and sizes.inputsAt(literal[0]).toIValue() > 1:
                    with graph.insert_point_guard(sizes):
                        sizes.replaceInput(literal[0], graph.insertConstant(-1))
                    rewritten = True
            for node in graph.findAllNodes("aten::split"):
                uses = list(node.output().uses())
                size = node.inputsAt(1)
                if (
                    len(uses) != 1
                    or uses[0].user.kind() != "prim::ListUnpack"
                    or size.node().kind() != "prim::Constant"
                    or not isinstance(size.toIValue(), int)
                ):
                    continue
                pieces = len(list(uses[0].user.outputs()))
                with graph.insert_point_guard(node):
                    length = _insert(graph, "aten::size", [node.inputsAt(0), node.inputsAt(2)])
                    padded = _insert(graph, "aten::add", [length, graph.insertConstant(pieces - 1)])
                    derived = _insert(graph, "aten::floordiv", [padded, graph.insertConstant(pieces)])
                node.replaceInput(1, derived)
                rewritten = True
    return rewritten


def _called_function(node: torch._C.Node) -> str | None:
    callee = node.inputsAt(0).node()
    return callee.s("name") if callee.kind() == "prim::Constant" and callee.hasAttribute("name") else None


def _one_constant_int(value: torch._C.Value) -> bool:
    """A list value that is always ``[n]`` for a constant ``n``."""
    node = value.node()
    if node.kind() == "prim::Constant":
        constant = value.toIValue()
        return isinstance(constant, (list, tuple)) and len(constant) == 1 and isinstance(constant[0], int)
    return (
        node.kind() == "prim::ListConstruct"
        and len(list(node.inputs())) == 1
        and node.inputsAt(0).node().kind() == "prim::Constant"
        and isinstance(node.inputsAt(0).toIValue(), int)
    )
