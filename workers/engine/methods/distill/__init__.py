"""Distillation: train a smaller student on the teacher's outputs (``torchscript``; written against
``nn.Module``, so ``.pt2`` programs reuse it through ``exported``)."""
