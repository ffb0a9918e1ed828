"""Export targets: the compressed model as extra deployable files, each exported, loaded, run and
timed on its own runtime. One module per target, ``registry.TARGETS`` is the table of them:

- ``onnx``: an ONNX file on onnxruntime (int8 by onnxruntime's quantizer, QDQ or dynamic);
- ``openvino``: OpenVINO IR (``model.xml`` + ``model.bin`` in one zip) on OpenVINO's CPU plugin
  (int8 by NNCF);
- ``executorch``: a ``.pte`` program lowered to XNNPACK on ExecuTorch's runtime (int8 by PT2E).

Each target exports the float model of the request (``common.TargetRequest``) and makes it int8
with its own tooling on the job's calibration batches. ``common`` and ``registry`` import neither
torch nor any runtime, and the target modules import theirs when called: ``runner`` runs an
artifact in a process without torch (ONNX, OpenVINO). Nothing is imported here.
"""
