"""Quantization: dynamic int8 / float16 by graph rewrite (``torchscript``, ``rewriter``, ``attention``),
static int8 calibrated on the examples (``static``), and PT2E quantization of ``.pt2`` programs (``exported``)."""
