"""Fused transformer ops spelled out as ``aten::linear`` calls, so their projections can run int8.

A scripted ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` takes its "fast path" in
inference: one fused op (``aten::_native_multi_head_attention``,
``aten::_transformer_encoder_layer_fwd``) that reads the projection weights as float tensors
and has no int8 variant. Dynamic quantization replaces each such node of the frozen graph by
the same computation written with ``aten::linear`` (the functions below, cloned into the graph),
and the weight rewrite then turns those linears into ``quantized::linear_dynamic``.

The functions follow torch's CPU kernels (``aten/src/ATen/native/transformers``): the packed
``in_proj`` projection, ``q`` scaled by ``1/sqrt(head_dim)``, a boolean mask applied by
``aten::_masked_softmax`` with the op's ``mask_type``, the FFN's relu or exact gelu, layer norms
before or after. Nested (padded-batch) inputs keep the fused op: the int8 linear has no nested
variant, and those weights are read dequantized there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engine.torchscript_graph import quiet_torchscript_warnings

# Fused op -> the positions of its weight inputs (what makes the node worth expanding).
FUSED_ATTENTION_WEIGHTS = {
    "aten::_native_multi_head_attention": (5, 7),
    "aten::_transformer_encoder_layer_fwd": (3, 5, 14, 16),
}


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    mask: Tensor | None,
    need_weights: bool,
    average_attn_weights: bool,
    mask_type: int | None,
) -> tuple[Tensor, Tensor]:
    if query.is_nested or key.is_nested or value.is_nested:
        return torch._native_multi_head_attention(
            query,
            key,
            value,
            embed_dim,
            num_heads,
            qkv_weight,
            qkv_bias,
            proj_weight,
            proj_bias,
            mask,
            need_weights,
            average_attn_weights,
            mask_type,
        )
    batch = query.size(0)
    head_dim = embed_dim // num_heads
    if query is key and key is value:  # self-attention: one packed projection
        q, k, v = F.linear(query, qkv_weight, qkv_bias).chunk(3, -1)
    else:
        w_q, w_k, w_v = qkv_weight.chunk(3)
        b_q, b_k, b_v = qkv_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q = q.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)
    k = k.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)
    v = v.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)
    weights = torch.empty(0)
    if mask is None and not need_weights:
        context = F.scaled_dot_product_attention(q, k, v)
    else:
        scores = torch.matmul(q * (1.0 / float(head_dim) ** 0.5), k.transpose(-2, -1))
        if mask is None:
            weights = torch.softmax(scores, -1)
        else:
            weights = torch._masked_softmax(scores, mask.to(torch.bool), -1, mask_type)
        context = torch.matmul(weights, v)
    output = F.linear(context.transpose(1, 2).reshape(batch, -1, embed_dim), proj_weight, proj_bias)
    if need_weights and average_attn_weights:
        weights = weights.sum(1) / num_heads
    return output, weights


def _encoder_layer(
    src: Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm_weight_1: Tensor,
    norm_bias_1: Tensor,
    norm_weight_2: Tensor,
    norm_bias_2: Tensor,
    ffn_weight_1: Tensor,
    ffn_bias_1: Tensor,
    ffn_weight_2: Tensor,
    ffn_bias_2: Tensor,
    mask: Tensor | None,
    mask_type: int | None,
) -> Tensor:
    if src.is_nested:
        return torch._transformer_encoder_layer_fwd(
            src,
            embed_dim,
            num_heads,
            qkv_weight,
            qkv_bias,
            proj_weight,
            proj_bias,
            use_gelu,
            norm_first,
            eps,
            norm_weight_1,
            norm_bias_1,
            norm_weight_2,
            norm_bias_2,
            ffn_weight_1,
            ffn_bias_1,
            ffn_weight_2,
            ffn_bias_2,
            mask,
            mask_type,
        )
    if src.numel() == 0:
        return src.clone()
    x = src
    if norm_first:
        x = F.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps)
    x = (
        _attention(
            x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, False, True, mask_type
        )[0]
        + src
    )
    if not norm_first:
        x = F.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps)
    residual = x
    if norm_first:
        x = F.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps)
    hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
    hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
    x = F.linear(hidden, ffn_weight_2, ffn_bias_2) + residual
    if not norm_first:
        x = F.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps)
    return x


@functools.cache
def _expansion(kind: str) -> torch._C.Graph:
    """The inlined graph of the function that computes ``kind``; its inputs follow the op's schema."""
    function = {
        "aten::_native_multi_head_attention": _attention,
        "aten::_transformer_encoder_layer_fwd": _encoder_layer,
    }[kind]
    with quiet_torchscript_warnings():
        graph = torch.jit.script(function).graph.copy()
        torch._C._jit_pass_inline(graph)
    return graph


def expand_fused_attention(graph: torch._C.Graph, reads_target: Callable[[torch._C.Value], bool]) -> list[str]:
    """Replace each fused attention node that reads a selected weight by its linear-based graph.

    ``reads_target(value)`` says whether a weight input is a constant chosen for int8. A
    multi-head attention node whose attention weights are used is expanded only when
    ``need_weights`` is a constant True: with False torch returns an undefined tensor, which a
    graph cannot make. Returns the kinds of the expanded nodes.
    """
    expanded = []
    for kind, weight_positions in FUSED_ATTENTION_WEIGHTS.items():
        for node in list(graph.findAllNodes(kind)):
            if not any(reads_target(node.inputsAt(i)) for i in weight_positions):
                continue
            outputs = list(node.outputs())
            if (
                kind == "aten::_native_multi_head_attention"
                and _is_read(outputs[1])
                and node.inputsAt(10).toIValue() is not True
            ):
                continue
            new_outputs = _clone_at(graph, _expansion(kind), node, list(node.inputs()))
            for old, new in zip(outputs, new_outputs):
                new.setType(old.type())
                old.replaceAllUsesWith(new)
            node.destroy()
            expanded.append(kind)
    return expanded


def _is_read(value: torch._C.Value, depth: int = 0) -> bool:
    """Whether anything reads ``value``, following it through tuples and ``if`` results.

    ``attn(x, x, x, need_weights=False)[0]`` packs the unused weights into a tuple that
    leaves an ``if`` and is indexed at 0 afterwards: that is not a read.
    """
    if depth > 16:
        return True
    for use in value.uses():
        user = use.user
        if user.kind() == "prim::TupleConstruct":
            if _element_is_read(user.output(), use.offset, depth + 1):
                return True
        elif (
            user.kind() == "prim::Return"
            and user.owningBlock().owningNode() is not None
            and user.owningBlock().owningNode().kind() == "prim::If"
        ):
            if _is_read(user.owningBlock().owningNode().outputsAt(use.offset), depth + 1):
                return True
        else:
            return True
    return False


def _element_is_read(tuple_value: torch._C.Value, index: int, depth: int) -> bool:
    for use in tuple_value.uses():
        user = use.user
        if user.kind() == "prim::TupleIndex" and user.inputsAt(1).toIValue() is not None:
            if user.inputsAt(1).toIValue() == index and _is_read(user.output(), depth + 1):
                return True
        elif user.kind() == "prim::TupleUnpack":
            if _is_read(user.outputsAt(index), depth + 1):
                return True
        elif (
            user.kind() == "prim::Return"
            and user.owningBlock().owningNode() is not None
            and user.owningBlock().owningNode().kind() == "prim::If"
        ):
            if _element_is_read(user.owningBlock().owningNode().outputsAt(use.offset), index, depth + 1):
                return True
        else:
            return True
    return False


def _clone_at(
    graph: torch._C.Graph, source: torch._C.Graph, node: torch._C.Node, inputs: list[torch._C.Value]
) -> list[torch._C.Value]:
    """Copy ``source``'s nodes into ``graph`` before ``node``, its inputs bound to ``inputs``; return its outputs."""
    env = dict(zip(source.inputs(), inputs))
    with graph.insert_point_guard(node):
        for original in source.nodes():
            clone = graph.createClone(original, lambda value: env[value])
            graph.insertNode(clone)
            for old, new in zip(original.outputs(), clone.outputs()):
                env[old] = new
    results = [env[value] for value in source.outputs()]
    if len(results) == 1 and len(list(node.outputs())) > 1:  # a tuple-returning function: unpack it
        with graph.insert_point_guard(node):
            unpack = graph.create("prim::TupleUnpack", results, len(list(node.outputs())))
            graph.insertNode(unpack)
        for out, old in zip(unpack.outputs(), node.outputs()):
            out.setType(old.type())
        results = list(unpack.outputs())
    return results
