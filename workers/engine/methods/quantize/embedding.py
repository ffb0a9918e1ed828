"""Embedding tables stored int8 with one scale per row: the lookup part of the dynamic rewrite (``rewriter.GraphRewriter``).

The table is torch's own byte-rowwise format (``quantized::embedding_bag_byte_prepack``): each row
``w_r`` becomes ``round((w_r - min_r) / s_r)`` in uint8 with ``s_r = (max_r - min_r) / 255``, the
row's float32 scale and offset appended (8 bytes). A lookup gathers the int8 rows it needs and
dequantizes only those (``quantized::embedding_bag_byte_unpack``); a bag reduces the gathered rows
with the float ``embedding_bag`` (the quantized bag kernel's ``mean`` disagrees with
``F.embedding_bag`` on torch 2.14.1, so it is not used). Any other read of the same weight (the
output layer of a language model that ties it to the input embedding) unpacks the whole table
where it is read: one int8 copy serves both.
"""

from __future__ import annotations

import functools

import torch

from workers.engine.torchscript_graph import quiet_torchscript_warnings

_FLOAT32 = 6  # TorchScript's integer code for torch.float32


def _lookup(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.ops.quantized.embedding_bag_byte_unpack(torch.embedding(table, indices))


def _bag(
    table: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    mode: int,
    per_sample_weights: torch.Tensor | None,
    include_last_offset: bool,
    padding_idx: int | None,
) -> torch.Tensor:
    """``embedding_bag`` over the dequantized rows ``indices`` names, each row looked up once per position."""
    flat = indices.reshape(-1)
    rows = torch.ops.quantized.embedding_bag_byte_unpack(torch.embedding(table, flat))
    positions = torch.arange(flat.numel(), dtype=indices.dtype, device=indices.device).reshape(indices.shape)
    padding: int | None = None
    if padding_idx is not None:  # padded entries point at an appended row, excluded as padding
        # aten wraps a negative padding_idx around the table (-1 is its last row), as it does here.
        wrapped = padding_idx if padding_idx >= 0 else table.size(0) + padding_idx
        positions = positions.masked_fill(indices == wrapped, flat.numel())
        rows = torch.cat([rows, rows.new_zeros(1, rows.size(1))])
        padding = flat.numel()
    return torch.embedding_bag(
        rows, positions, offsets, False, mode, False, per_sample_weights, include_last_offset, padding
    )[0]


def _lookup_half(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.embedding(table, indices).float()


@functools.cache
def _graph(name: str) -> torch._C.Graph:
    with quiet_torchscript_warnings():  # compiled on first use, not when the engine is imported
        return torch.jit.script({"lookup": _lookup, "bag": _bag, "lookup_half": _lookup_half}[name]).graph


class EmbeddingRewrites:
    """Part of ``GraphRewriter``: ``aten::embedding`` / ``aten::embedding_bag`` over a constant table."""

    def rewrite_embedding(self, node: torch._C.Node, weight: torch.Tensor, uses: list[torch._C.Use]) -> bool:
        """Store a table read by lookups as int8 rows (float16 rows with dtype float16); False if
        nothing here looks rows up. ``uses``: the constant's uses, unchecked casts looked through."""
        lookups = [use for use in uses if _is_lookup(use, self.dtype)]
        others = [use for use in uses if not _is_lookup(use, self.dtype)]  # before the lookups are replaced
        if not lookups or weight.dim() != 2 or not weight.is_floating_point():
            return False
        stored = (
            weight.detach().half()
            if self.dtype == "float16"
            else torch.ops.quantized.embedding_bag_byte_prepack(weight.detach().float().contiguous())
        )
        with self.graph.insert_point_guard(self._after_constants()):
            table = self.graph.insertConstant(stored)
        for use in lookups:
            self._to_lookup(use.user, table)
        float_reads = set()
        for use in others:
            if self._fold_metadata(use, weight):
                continue
            float_reads.add(use.user.kind())
            with self.graph.insert_point_guard(use.user):  # only the branch that reads it pays
                if self.dtype == "float16":
                    whole = self.graph.insert("aten::to", [table, self.graph.insertConstant(_FLOAT32)])
                else:
                    whole = self.graph.insert("quantized::embedding_bag_byte_unpack", [table])
            use.user.replaceInput(use.offset, whole)
        kind = "float16" if self.dtype == "float16" else "int8"
        self.last_reason = (
            f"{kind} rows looked up; {', '.join(sorted(float_reads))} read the whole table "
            "dequantized (a tied output layer shares the one copy)"
            if float_reads
            else None
        )
        return True

    def _to_lookup(self, user: torch._C.Node, table: torch._C.Value) -> None:
        with self.graph.insert_point_guard(user):
            if user.kind() == "aten::embedding":
                name = "lookup_half" if self.dtype == "float16" else "lookup"
                (output,) = self.graph.insertGraph(_graph(name), [table, user.inputsAt(1)])
            else:
                padding = user.inputsAt(8) if len(list(user.inputs())) > 8 else self.graph.insertConstant(None)
                arguments = [
                    table,
                    user.inputsAt(1),
                    user.inputsAt(2),
                    user.inputsAt(4),
                    user.inputsAt(6),
                    user.inputsAt(7),
                    padding,
                ]
                (output,) = self.graph.insertGraph(_graph("bag"), arguments)
        output.setType(user.outputsAt(0).type())
        user.outputsAt(0).replaceAllUsesWith(output)
        user.destroy()


def _is_lookup(use: torch._C.Use, dtype: str) -> bool:
    """A lookup the int8 rows serve: an embedding, or a bag whose other outputs (offsets, sizes) nothing reads."""
    user = use.user
    if use.offset != 0:
        return False
    if user.kind() == "aten::embedding":
        return True
    return (
        user.kind() == "aten::embedding_bag"
        and dtype == "qint8"
        and not any(output.uses() for output in list(user.outputs())[1:])
    )


def has_lookup(uses: list[torch._C.Use]) -> bool:
    """Whether a weight is read as an embedding table (what makes a layer an embedding, whatever its class)."""
    return any(use.offset == 0 and use.user.kind() in ("aten::embedding", "aten::embedding_bag") for use in uses)
