"""The compression engine: plain torch, no Flask, Celery or Redis.

Read the folders bottom to top; each imports only from the ones before it (no cycles):

- ``errors``, ``torchscript_graph``, ``torchscript_sizes``, ``linear_forms``, ``inputs``, ``outputs``,
  ``measure``: what every part shares: typed errors, TorchScript graph plumbing (freeze, canonicalise,
  rewrite; sizes derived rather than constant), linear layers in every spelling (``linear``,
  ``addmm``, ``matmul``: read once for quantization and pruning), the job's data and example
  batches, picking a model output, and measuring a model.
- ``analysis/``: the channel analysis that structured pruning is built on (the graph walk and its
  channel groups, slicing, and the proof of a slicing), and reading ``.pt2`` program graphs.
- ``formats/``: one module per file format (TorchScript ``.pt``, torch.export ``.pt2``): each knows
  how to load, check, save and time itself; ``formats.registry`` is the table of them.
- ``methods/``: one package per method (quantize, prune, distill): the TorchScript entry in
  ``torchscript.py``, the ``.pt2`` one in ``exported.py`` next to it; ``methods.registry`` is the one
  place that maps a method name to its entry for a format.
- ``targets/``: where export targets plug in (ONNX, OpenVINO, ExecuTorch: one module each).
- ``run/``: one job's run on top: prepare (load, measure the original), run the steps (or a
  search), measure the result and write the report.

Every method entry has the same shape, ``(model, options, data, progress) -> (model, details)``;
``run.pipeline.compress`` runs load -> method -> save -> measure around it.
"""
