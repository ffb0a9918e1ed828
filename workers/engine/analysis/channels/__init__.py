"""Groups of coupled channels, read from a TorchScript graph.

Pruning one output channel of a conv means removing the same channel from everything that
shares it: the BatchNorm after it, the input channels of its consumers, every tensor joined to
it by an elementwise op (a residual addition or a squeeze-and-excitation scale ties two channel
spaces into one group), and the rows of a depthwise conv that reads it. A concatenation along
channels makes a consumer's input a sequence of segments, one per input.

The analysis walks a canonical copy of ``forward`` (``torchscript.canonical_graph``: inlined,
module flags folded, dead branches gone), giving each activation an *axis*: the channel space
its channel dimension indexes, where that dimension is, and how many entries each channel
covers there (``scale``: 1 for a conv output, H*W after a flatten, the multiplier after a
depthwise conv). Each space collects the parameter slices (*members*) that index it. Shapes
come from one run of the graph on the example inputs. A space that reaches an op the analysis
does not model, the model's inputs or outputs, or a reshape that splits channels is *blocked*:
it is left whole, with the reason kept for the report. Torch-Pruning's dependency graph
(VainF/Torch-Pruning) is the reference for which ops couple what.

A ``layer_norm`` over the channel dimension couples its weight and bias like a BatchNorm, but
it also computes statistics over the channels: removing some changes the mean and variance of
the rest. Such a space records the norm (its ordinal among the graph's ``aten::layer_norm``
nodes, ``Norm``) so the check after slicing can build a reference whose statistics cover the
kept channels only (``methods/prune``), and the report can say the group was renormalised.

The analysis is one walk (``walk.ChannelAnalysis``) over the graph, read in pieces:
``ops`` (which ops it knows), ``walk`` (visiting nodes and branches), ``layers`` (convolutions,
linear layers, norms: where channels are made and read), ``reshapes`` (ops that move or keep the
channel dimension of one tensor), ``joins`` (elementwise ops and concatenations that tie channel
spaces together), ``values`` (each value's axis, and what an unknown op blocks) and ``spaces``
(channel spaces, their members, and the groups they become).
"""

from __future__ import annotations

import torch

from workers.engine.analysis.channels.spaces import ChannelGroup, Member, Norm, layer_name
from workers.engine.analysis.channels.values import constant, nested_nodes
from workers.engine.analysis.channels.walk import ChannelAnalysis
from workers.engine.torchscript_graph import canonical_graph, value_shapes


def channel_groups(
    model: torch.jit.ScriptModule, shapes: dict[str, torch.Size], example: tuple[torch.Tensor, ...] | None = None
) -> list[ChannelGroup]:
    """All channel groups of ``model``; ``shapes`` maps parameter and buffer names to their shapes.

    ``example`` (a few rows of each input) lets the analysis learn the shape of every value.
    """
    graph = canonical_graph(model)
    values = value_shapes(model, graph, example) if example is not None else {}
    analysis = ChannelAnalysis(shapes, values, layer_norm_nodes(graph))
    analysis.run(graph)
    return analysis.groups()


def layer_norm_nodes(graph: torch._C.Graph) -> list[torch._C.Node]:
    """Every ``aten::layer_norm`` and RMSNorm mean (``rms_mean``) of ``graph``, nested blocks included,
    in one fixed order: ``Norm.index``."""
    return [node for node in nested_nodes(graph.block()) if node.kind() == "aten::layer_norm" or rms_mean(node)]


def rms_mean(node: torch._C.Node) -> bool:
    """The statistic of an RMSNorm (Llama's): ``mean(x.pow(2), [-1], keepdim=True)`` whose ``rsqrt`` (after
    an added epsilon) multiplies ``x`` itself. Removing channels changes it as a layer_norm's mean and
    variance; any other mean across the channels (a mean-square feature, a mean over dimension 1) is
    left to block its space."""
    if node.kind() != "aten::mean" or node.inputsSize() < 3:
        return False
    source = node.inputsAt(0).node()
    if source.kind() != "aten::pow" or source.inputsAt(1).node().kind() != "prim::Constant":
        return False
    exponent, dims, keep = source.inputsAt(1).toIValue(), constant(node.inputsAt(1)), constant(node.inputsAt(2))
    if not isinstance(exponent, (int, float)) or exponent != 2 or dims != [-1] or keep is not True:
        return False
    x, value = source.inputsAt(0), node.output()
    for _ in range(2):  # through ``+ eps`` (one add), to the rsqrt
        users = [use.user for use in value.uses()]
        if len(users) != 1:
            return False
        if users[0].kind() == "aten::rsqrt":
            scales = [use.user for use in users[0].output().uses()]
            return bool(scales) and all(user.kind() == "aten::mul" and x in list(user.inputs())[:2] for user in scales)
        if users[0].kind() not in ("aten::add", "aten::add_") or users[0].inputsAt(0) is not value:
            return False
        value = users[0].output()
    return False


__all__ = ["ChannelGroup", "Member", "Norm", "channel_groups", "layer_name", "layer_norm_nodes", "rms_mean"]
