"""Before PT2E sees a ``.pt2`` program: linear layers in any spelling made ``aten.linear``, and
embedding tables stored int8 with one scale per row.

- **Linear forms** (the FX counterpart of ``workers.engine.linear_forms``): ``transformers``'
  ``Conv1D`` (GPT-2) exports as ``addmm(b, x, W)`` with ``W`` ``[in, out]``; hand-written layers as
  ``x @ W`` (``mm`` / ``matmul``) or ``x @ W.t()``. Each is ``linear(x, M, b)`` for one ``[out, in]``
  matrix ``M``: the stored weight, or its transpose, stored transposed once in place of the original
  (a copy only if the original is read elsewhere too). The x86 quantizer annotates ``aten.linear``
  ops, so after this pass it sees these layers like ``nn.Linear``.
- **Embeddings**: ``embedding(W, ids)`` becomes ``embedding(Q, ids) * embedding(S, ids)`` with ``Q``
  int8 ``[rows, dim]`` (symmetric, per row) and ``S`` float32 ``[rows, 1]``: a lookup gathers and
  dequantizes only its rows. Any other read of the same table (a language model's output layer tied
  to its input embedding) becomes ``Q * S`` where it is read: one int8 copy serves both, and that
  layer is left out of PT2E (its weight is no longer stored).
"""

from __future__ import annotations

from typing import Any

import torch

from workers.engine.analysis.program_graph import attribute, is_attribute, module_path

aten = torch.ops.aten
# Smallest weight worth quantizing: below this the int8 copy plus its scales saves almost nothing.
MIN_QUANTIZED_ELEMENTS = 1024
_TRANSPOSES = {aten.t.default, aten.numpy_T.default}
_PRODUCTS = {aten.addmm.default: "addmm", aten.mm.default: "mm", aten.matmul.default: "matmul"}
_LINEAR = aten.linear.default
_EMBEDDING = aten.embedding.default


def canonical_linears(module: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """Rewrite each product of an input and a stored 2-D float weight as ``aten.linear``; what was rewritten."""
    rewritten = []
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target not in _PRODUCTS:
            continue
        form = _PRODUCTS[node.target]
        if form == "addmm":
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
                continue
            bias, source, weight = node.args
        else:
            (source, weight), bias = node.args, None
        stored, transposed = _stored_matrix(module, weight)
        if stored is None or not isinstance(source, torch.fx.Node):
            continue
        out = int(attribute(module, stored.target).shape[0 if transposed else 1])
        if bias is not None and not (isinstance(bias, torch.fx.Node) and _shape(module, bias) in ((out,), None)):
            continue
        matrix = stored if transposed else _transposed_attribute(module, stored)
        with module.graph.inserting_before(node):
            linear = module.graph.call_function(_LINEAR, (source, matrix) + ((bias,) if bias is not None else ()))
        linear.meta.update({key: value for key, value in node.meta.items() if key != "source_fn_stack"})
        # The x86 quantizer finds linear layers by source partition: typed F.linear, as the layer now is.
        linear.meta["source_fn_stack"] = [(f"{module_path(node)}#{linear.name}", torch.nn.functional.linear)]
        node.replace_all_uses_with(linear)
        module.graph.erase_node(node)
        _erase_if_unused(module.graph, weight)
        rewritten.append({"op": linear.name, "module": module_path(linear), "form": form})
    if rewritten:
        module.graph.lint()
        module.recompile()
    return rewritten


def int8_embeddings(module: torch.fx.GraphModule, exclude_owner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Store each embedding table of at least ``MIN`` weights as int8 rows; (quantized, left float).
    ``exclude_owner(owner)`` gives a reason to leave a table's module float, or None."""
    done: dict[str, tuple[torch.fx.Node, torch.fx.Node, torch.dtype]] = {}
    quantized, skipped = [], []
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target is not _EMBEDDING or not is_attribute(node.args[0]):
            continue
        table_node = node.args[0]
        owner = module_path(node)
        table = attribute(module, table_node.target)
        reason = exclude_owner(owner) or (
            None if table.is_floating_point() and table.dim() == 2 else "not a 2-D float table"
        )
        if reason is None and table.numel() < MIN_QUANTIZED_ELEMENTS:
            reason = f"fewer than {MIN_QUANTIZED_ELEMENTS} weights"
        if reason is not None:
            skipped.append({"op": node.name, "module": owner, "type": "Embedding", "reason": reason})
            continue
        if table_node.target not in done:
            done[table_node.target] = (*_int8_table(module, table_node, table), table.dtype)
        values, scales, _ = done[table_node.target]
        with module.graph.inserting_before(node):
            rows = module.graph.call_function(_EMBEDDING, (values, *node.args[1:]), dict(node.kwargs))
            wide = module.graph.call_function(aten._to_copy.default, (rows,), {"dtype": table.dtype})
            scale = module.graph.call_function(_EMBEDDING, (scales, node.args[1]))
            looked_up = module.graph.call_function(aten.mul.Tensor, (wide, scale))
        for made in (rows, wide, scale, looked_up):
            made.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_all_uses_with(looked_up)
        module.graph.erase_node(node)
        quantized.append(
            {
                "op": looked_up.name,
                "module": owner,
                "type": "Embedding",
                "weights": table.numel(),
                "kernel": "int8 rows (weight-only)",
                "_table": table_node.target,
            }
        )
    tied: dict[str, list[str]] = {}
    for name, (values, scales, dtype) in done.items():
        table_node = next((n for n in module.graph.nodes if n.op == "get_attr" and n.target == name), None)
        if table_node is None:
            continue
        for user in list(table_node.users):  # other reads: the whole table, dequantized where it is read
            with module.graph.inserting_before(user):
                wide = module.graph.call_function(aten._to_copy.default, (values,), {"dtype": dtype})
                full = module.graph.call_function(aten.mul.Tensor, (wide, scales))
            user.replace_input_with(table_node, full)
            tied.setdefault(name, []).append(module_path(user))
        module.graph.erase_node(table_node)
    for entry in quantized:
        entry["tied_to"] = sorted(set(tied.get(entry.pop("_table"), []))) or None
    if done:
        module.graph.lint()
        module.recompile()
    return quantized, skipped


def product_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The weight operand of a linear layer in another spelling (``addmm``'s third argument, the right
    side of ``mm`` / ``matmul``), a transpose of it looked through; None for other ops. Works on a
    program's own graph (weights are placeholders) and on its module's (get_attr)."""
    if node.op != "call_function" or node.target not in _PRODUCTS or len(node.args) < 2:
        return None
    weight = node.args[2] if node.target is aten.addmm.default else node.args[1]
    if isinstance(weight, torch.fx.Node) and weight.op == "call_function" and _is_transpose(weight):
        weight = weight.args[0]
    return weight if isinstance(weight, torch.fx.Node) else None


# ----------------------------------------------------------------------------- helpers


def _is_transpose(node: torch.fx.Node) -> bool:
    return (
        node.target in _TRANSPOSES
        or (node.target is aten.transpose.int and sorted(a % 2 for a in node.args[1:3]) == [0, 1])
        or (node.target is aten.permute.default and [a % 2 for a in node.args[1]] == [1, 0])
    )


def _stored_matrix(module: torch.nn.Module, weight: Any) -> tuple[torch.fx.Node | None, bool]:
    """(the get_attr node of a stored 2-D float weight, whether it is read transposed), or (None, False)."""
    transposed = False
    if isinstance(weight, torch.fx.Node) and weight.op == "call_function" and _is_transpose(weight):
        weight, transposed = weight.args[0], True
    if not is_attribute(weight):
        return None, False
    value = attribute(module, weight.target)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        return None, False
    return weight, transposed


def _shape(module: torch.nn.Module, node: torch.fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    if value is None and node.op == "get_attr":
        value = attribute(module, node.target)
    return tuple(int(size) for size in value.shape) if isinstance(value, torch.Tensor) else None


def _transposed_attribute(module: torch.nn.Module, stored: torch.fx.Node) -> torch.fx.Node:
    """A get_attr of the stored ``[in, out]`` weight made ``[out, in]``: in place when nothing else reads
    it as stored, else as a new attribute beside it."""
    value = attribute(module, stored.target)
    owner_name, _, leaf = stored.target.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    others = [user for user in stored.users if user.target not in _PRODUCTS]
    if not others and len(stored.users) == 1:
        setattr(owner, leaf, torch.nn.Parameter(value.detach().t().contiguous(), requires_grad=False))
        return stored
    name = f"{leaf}_linear"
    setattr(owner, name, torch.nn.Parameter(value.detach().t().contiguous(), requires_grad=False))
    with module.graph.inserting_after(stored):
        node = module.graph.get_attr(f"{owner_name}.{name}" if owner_name else name)
    return node


def _int8_table(
    module: torch.nn.Module, table_node: torch.fx.Node, table: torch.Tensor
) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Register the table's int8 rows and per-row scales beside it; their get_attr nodes."""
    scales = (table.detach().abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12).to(torch.float32)
    values = torch.round(table.detach() / scales).clamp(-127, 127).to(torch.int8)
    owner_name, _, leaf = table_node.target.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner.register_buffer(f"{leaf}_int8", values)
    owner.register_buffer(f"{leaf}_scale", scales)
    prefix = f"{owner_name}." if owner_name else ""
    with module.graph.inserting_after(table_node):
        values_node = module.graph.get_attr(f"{prefix}{leaf}_int8")
        scales_node = module.graph.get_attr(f"{prefix}{leaf}_scale")
    return values_node, scales_node


def _erase_if_unused(graph: torch.fx.Graph, node: Any) -> None:
    while isinstance(node, torch.fx.Node) and not node.users:
        source = node.args[0] if node.op == "call_function" and node.args else None
        graph.erase_node(node)
        node = source
