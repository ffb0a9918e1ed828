"""Pruning: magnitude (unstructured) and channel (structured) pruning of TorchScript models
(``torchscript``), and of ``.pt2`` programs (``exported``: weights in place, channels on a trace)."""
