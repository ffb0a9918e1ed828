"""TorchScript graph plumbing shared by the methods.

TorchScript is deprecated in torch 2.14 but still works; every direct use of its
internals lives here (and in ``methods/quantize/rewriter.py``'s graph rewrite) so a port to
torch.export touches few places.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.jit._recursive import wrap_cpp_module


@contextlib.contextmanager
def quiet_torchscript_warnings() -> Iterator[None]:
    """Silence the 2.14 deprecation warnings of TorchScript and torch.ao.quantization."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", category=UserWarning, message=r".*(TorchScript|torch\.jit|deprecated|quantiz).*"
        )
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


def fold_tensor_attributes(frozen: torch.jit.ScriptModule) -> int:
    """Make the tensor attributes a frozen ``forward`` still reads into graph constants.

    Freezing keeps an attribute when alias analysis cannot rule out a write to it, which
    happens to ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``in_proj_bias`` (they flow into
    the fast path's tuple of checked tensors). Nothing writes them in inference, so they become
    constants like every other weight (same tensors, so the storage pointers still name their
    parameters), and the attributes are emptied so the saved file does not carry a float copy.
    Attributes the graph assigns (``prim::SetAttr``) are left alone. Returns how many were folded.
    """
    graph = frozen.graph
    assigned = {node.s("name") for node in graph.findAllNodes("prim::SetAttr")}
    owners: dict[torch._C.Value, torch._C.ScriptModule] = {next(graph.inputs()): frozen._c}
    reads: dict[tuple[int, str], list[torch._C.Node]] = {}  # (tensor pointer, attribute) -> its reads
    found: dict[tuple[int, str], tuple[torch._C.ScriptModule, torch.Tensor]] = {}
    for node in _all_nodes(graph.block()):
        if node.kind() != "prim::GetAttr" or node.inputsAt(0) not in owners:
            continue
        owner, name = owners[node.inputsAt(0)], node.s("name")
        value = owner.getattr(name)
        if isinstance(value, torch._C.ScriptModule):
            owners[node.output()] = value
        elif isinstance(value, torch.Tensor) and name not in assigned and value.numel():
            key = (value.data_ptr(), name)
            reads.setdefault(key, []).append(node)
            found[key] = (owner, value)
    first = next(iter(graph.nodes()), graph.return_node())
    constants: dict[tuple[int, tuple[int, ...]], torch._C.Value] = {}  # one constant per tensor
    folded = 0
    for key, nodes in reads.items():
        if any(_may_write(use) for node in nodes for use in node.output().uses()):
            continue  # written in place somewhere: it stays an attribute
        owner, value = found[key]
        shape_key = (value.data_ptr(), tuple(value.shape))
        if shape_key not in constants:
            with graph.insert_point_guard(first):
                constants[shape_key] = graph.insertConstant(value.detach())  # same storage
        for node in nodes:
            node.output().replaceAllUsesWith(constants[shape_key])
        owner.setattr(key[1], torch.empty(0))
        folded += 1
    torch._C._jit_pass_dce(graph)
    return folded


def _may_write(use: torch._C.Use) -> bool:
    """Whether a use may modify the value in place (``add_``, ``copy_``, an ``out=`` argument)."""
    text = use.user.schema()
    if text == "(no schema)":  # not an operator (a call, a list, an if): assume the worst
        return use.user.kind() not in {"prim::ListConstruct", "prim::TupleConstruct", "prim::unchecked_cast"}
    schema = torch._C.parse_schema(text)
    if use.offset >= len(schema.arguments):
        return True
    alias = schema.arguments[use.offset].alias_info
    return alias is not None and alias.is_write


def _all_nodes(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in list(block.nodes()):
        yield node
        for inner in node.blocks():
            yield from _all_nodes(inner)


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


# ---------------------------------------------------------------------------- canonical graphs


def canonical_graph(model: torch.jit.ScriptModule) -> torch._C.Graph:
    """A copy of ``forward``, inlined, with module attributes of plain types made constants and dead branches gone.

    Scripting inlines functional calls with their option checks (``F.relu``'s ``if inplace:``),
    and modules branch on their own flags (``if self.use_res_connect:``, ``if self.training:``).
    Both are constants for a given model, so folding them makes functional code look like module
    code and leaves only real branches. Tensor attributes stay ``prim::GetAttr`` nodes so every
    weight keeps its qualified name.
    """
    with quiet_torchscript_warnings():
        graph = model.inlined_graph
    owners: dict[torch._C.Value, object] = {next(graph.inputs()): model}
    for node in list(graph.nodes()):
        _fold_node(graph, node, owners)
    torch._C._jit_pass_constant_propagation_immutable_types(graph)
    torch._C._jit_pass_dce(graph)
    return graph


def _fold_node(graph: torch._C.Graph, node: torch._C.Node, owners: dict) -> None:
    if node.kind() == "prim::GetAttr":
        owner = owners.get(node.inputsAt(0))
        if owner is not None:
            value = getattr(owner, node.s("name"), None)
            if isinstance(value, torch.nn.Module):
                owners[node.output()] = value
            elif value is None or isinstance(value, (bool, int, float, str)) or _fixed_sequence(node, value):
                constant = graph.insertConstant(value)
                constant.node().moveBefore(node)
                node.output().replaceAllUsesWith(constant)
    for block in node.blocks():
        for inner in list(block.nodes()):
            _fold_node(graph, inner, owners)


# List ops that change a list in place: a list attribute they touch is state, not a constant.
_LIST_MUTATIONS = {
    "aten::append",
    "aten::insert",
    "aten::pop",
    "aten::clear",
    "aten::extend",
    "aten::remove",
    "aten::_set_item",
    "aten::reverse",
    "aten::sort",
    "aten::add_",
}


def _fixed_sequence(node: torch._C.Node, value: object) -> bool:
    """A list or tuple of numbers that ``forward`` only reads (``Permute``'s ``dims``, a norm's shape)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, (bool, int, float)) for item in value):
        return False
    return not any(use.user.kind() in _LIST_MUTATIONS for use in node.output().uses())


def value_shapes(
    model: torch.jit.ScriptModule, graph: torch._C.Graph, inputs: tuple[torch.Tensor, ...]
) -> dict[torch._C.Value, tuple[int, ...]]:
    """Shapes of the top-level tensor values of ``graph`` (a canonical graph of ``model``) on ``inputs``.

    A copy of the graph returns every tensor it computes, and runs once: this is how the
    analysis learns ranks and the sizes a flatten merges into channels. Values inside real
    branches are not reported. An empty map if the graph does not run.
    """
    copy = graph.copy()
    originals = [v for node in graph.nodes() for v in node.outputs()]
    copies = [v for node in copy.nodes() for v in node.outputs()]
    chosen = [(o, c) for o, c in zip(originals, copies) if c.type().kind() == "TensorType"]
    if not chosen:
        return {}
    while len(list(copy.outputs())):
        copy.eraseOutput(0)
    values = [c for _, c in chosen]
    pack = copy.create("prim::TupleConstruct", values)
    copy.appendNode(pack)
    pack.output().setType(torch._C.TupleType([v.type() for v in values]))
    copy.registerOutput(pack.output())
    try:
        with torch.no_grad(), quiet_torchscript_warnings():
            function = torch._C._create_function_from_graph("canonical_shapes", copy)
            results = function(model._c, *inputs)
    except Exception:  # a model that runs only through its methods: the analysis works without shapes
        return {}
    return {o: tuple(t.shape) for (o, _), t in zip(chosen, results) if isinstance(t, torch.Tensor)}


def _masked_layer_norm(
    x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``layer_norm`` over the last dimension with mean and variance taken over the kept entries only."""
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count
    centred = (x - mean) * keep
    y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's ``mean(x ** 2, -1, keepdim=True)`` over the kept entries only."""
    return (x * keep).sum(-1, keepdim=True) / keep.sum()


@functools.cache
def _masked_layer_norm_graph() -> torch._C.Graph:
    with quiet_torchscript_warnings():  # compiled on first use, not when the engine is imported
        return torch.jit.script(_masked_layer_norm).graph


@functools.cache
def _masked_mean_graph() -> torch._C.Graph:
    with quiet_torchscript_warnings():
        return torch.jit.script(_masked_mean).graph


def with_masked_layer_norms(
    model: torch.jit.ScriptModule,
    keep: dict[int, torch.Tensor],
    layer_norms: Callable[[torch._C.Graph], list[torch._C.Node]],
) -> Callable[..., object]:
    """``forward`` of ``model`` (its canonical graph) with some layer norms' statistics over kept entries only.

    ``keep`` maps an index into ``layer_norms(graph)`` to a 0/1 mask of its last dimension. With
    the dropped entries' parameters zeroed, this computes exactly what the model computes once
    those entries are sliced away: the reference a slicing through a layer norm must match.
    """
    graph = canonical_graph(model)
    nodes = layer_norms(graph)
    for index, mask in keep.items():
        node = nodes[index]
        with graph.insert_point_guard(node):
            if node.kind() == "aten::mean":  # an RMSNorm's mean of squares (``channels.rms_mean``)
                (masked,) = graph.insertGraph(_masked_mean_graph(), [node.inputsAt(0), graph.insertConstant(mask)])
            else:
                arguments = [
                    node.inputsAt(0),
                    graph.insertConstant(mask),
                    node.inputsAt(2),
                    node.inputsAt(3),
                    node.inputsAt(4),
                ]
                (masked,) = graph.insertGraph(_masked_layer_norm_graph(), arguments)
        node.output().replaceAllUsesWith(masked)
        node.destroy()
    function = torch._C._create_function_from_graph("masked_layer_norms", graph)
    return lambda *inputs: function(model._c, *inputs)
