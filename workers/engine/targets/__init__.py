"""Export targets plug in here: one module per target (ONNX, OpenVINO, ExecuTorch: issue 25), each
turning the compressed model into the target's file, checking it against the model and timing it.

Empty for now: a job's output is the format it came in (``formats/``), or an AOTInductor package of
a ``.pt2`` program (``formats/aoti.py``).
"""
