"""LSTM and GRU layers onto int8 kernels: the recurrent part of the dynamic rewrite (``rewriter.GraphRewriter``)."""

from __future__ import annotations

import torch

_RNN_KERNELS = {"aten::lstm": "aten::quantized_lstm", "aten::gru": "aten::quantized_gru"}


class RecurrentRewrites:
    """Part of ``GraphRewriter``: swaps ``aten::lstm`` / ``aten::gru`` over a constant weight list
    for ``aten::quantized_lstm`` / ``quantized_gru`` over prepacked int8 cells."""

    def rewrite_rnn(self, node: torch._C.Node, tensors: list[torch.Tensor]) -> bool:
        """Swap ``aten::lstm`` / ``aten::gru`` reading this flat weight list for the int8 kernels.

        The replacement is what eager ``quantize_dynamic`` runs: ``aten::quantized_lstm`` /
        ``aten::quantized_gru`` over one ``CellParamsBase`` per layer and direction, built by
        ``quantized::make_quantized_cell_params_dynamic`` from prepacked int8 ``w_ih``/``w_hh``.
        Returns False (nothing changed) for what it does not cover: float16, projections
        (``proj_size``), a weight list read by anything else.
        """
        uses = list(node.output().uses())
        if self.dtype != "qint8" or not uses:
            return False
        for use in uses:
            if use.user.kind() not in _RNN_KERNELS or use.offset not in (2, 3):
                return False
            if use.user.inputsAt(use.offset + 1).toIValue() is None:  # has_biases must be a constant
                return False
        has_biases = bool(uses[0].user.inputsAt(uses[0].offset + 1).toIValue())
        if any(bool(use.user.inputsAt(use.offset + 1).toIValue()) != has_biases for use in uses):
            return False
        per_cell = 4 if has_biases else 2
        if len(tensors) % per_cell or any(t.dim() != (2 if i % per_cell < 2 else 1) for i, t in enumerate(tensors)):
            return False  # e.g. proj_size adds a third weight per cell
        cells = []
        for start in range(0, len(tensors), per_cell):
            w_ih, w_hh = tensors[start], tensors[start + 1]
            if w_ih.shape[0] != w_hh.shape[0] or w_hh.shape[1] * (w_ih.shape[0] // w_hh.shape[1]) != w_ih.shape[0]:
                return False
            if has_biases:
                b_ih, b_hh = tensors[start + 2].detach().float(), tensors[start + 3].detach().float()
            else:
                b_ih = b_hh = torch.zeros(w_ih.shape[0])
            # Per tensor, as eager quantize_dynamic does: fbgemm's per-channel output stage costs
            # more than it gains on the small per-step matrices (LSTM+GRU 2x256, batch 8: per
            # channel 1.07x the eager model's time, per tensor 0.93x; cosine 0.9998 either way).
            packed_ih = torch.ops.quantized.linear_prepack(self._quantize_int8(w_ih, per_channel=False), b_ih)
            packed_hh = torch.ops.quantized.linear_prepack(self._quantize_int8(w_hh, per_channel=False), b_hh)
            # reduce_range=True, as for linear_dynamic above (and as eager quantize_dynamic does).
            cells.append(torch.ops.quantized.make_quantized_cell_params_dynamic(packed_ih, packed_hh, b_ih, b_hh, True))
        with self.graph.insert_point_guard(self._after_constants()):
            values = [self.graph.insertConstant(cell) for cell in cells]
            cell_list = self.graph.create("prim::ListConstruct", values)
            cell_list.output().setType(torch._C.ListType(values[0].type()))
            self.graph.insertNode(cell_list)
        for use in uses:
            self._to_quantized_rnn(use.user, use.offset, cell_list.output())
        return True

    def _to_quantized_rnn(self, rnn: torch._C.Node, params_at: int, cells: torch._C.Value) -> None:
        inputs = list(rnn.inputs())
        inputs[params_at] = cells
        with self.graph.insert_point_guard(rnn):
            # The quantized kernels require biases; cells of a bias-free RNN carry zeros.
            inputs[params_at + 1] = self.graph.insertConstant(True)
        quantized = self.graph.create(_RNN_KERNELS[rnn.kind()], inputs, len(list(rnn.outputs())))
        if rnn.kind() == "aten::lstm":
            with self.graph.insert_point_guard(rnn):
                # The keyword-only arguments of quantized_lstm: int8 weights, dynamic activations.
                quantized.addInput(self.graph.insertConstant(torch.qint8))
                quantized.addInput(self.graph.insertConstant(True))
        quantized.insertBefore(rnn)
        for old, new in zip(rnn.outputs(), quantized.outputs()):
            new.setType(old.type())
            old.replaceAllUsesWith(new)
        rnn.destroy()
