"""Typed failures of the engine. The service maps them to problem+json in one place."""


class CompressionError(Exception):
    """Base class: ``str(error)`` is a sentence a user can act on."""

    title = "Compression failed"
    slug = "compression-failed"


class InvalidModel(CompressionError):
    """The uploaded file is not a TorchScript model we can load."""

    title = "Invalid model"
    slug = "invalid-model"


class InvalidInput(CompressionError):
    """Example inputs (``input_shape`` or the ``data`` file) do not fit the model."""

    title = "Invalid input"
    slug = "invalid-input"


class OutOfMemory(CompressionError):
    """An allocation failed: the model needs more memory than the job may use."""

    title = "Out of memory"
    slug = "out-of-memory"


class UnsupportedModel(CompressionError):
    """The model is valid but the requested method cannot be applied to it."""

    title = "Unsupported model"
    slug = "unsupported-model"


class NothingToPrune(UnsupportedModel):
    """Structured pruning found no channel group it could remove safely: the job fails rather than change nothing."""

    title = "Nothing to prune"
    slug = "nothing-to-prune"


class UnsafeModel(CompressionError):
    """The model's code calls an operator that reaches outside the tensors it is given (files, processes)."""

    title = "Unsafe model"
    slug = "unsafe-model"


class TargetNotMet(CompressionError):
    """A search found no candidate that keeps the target's metric; ``report`` lists every trial."""

    title = "Target not met"
    slug = "target-not-met"

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class TargetFailed(CompressionError):
    """An export target (ONNX, OpenVINO, ExecuTorch) could not express, quantize or run the model;
    the message names the target and the exporter's own reason in one line."""

    title = "Export target failed"
    slug = "target-failed"

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"{target}: {message}")
        self.target = target


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure, however it surfaced: Python's MemoryError or torch's allocator message."""
    if isinstance(error, (MemoryError, OutOfMemory)):
        return True
    message = str(error)
    return "can't allocate memory" in message or "not enough memory" in message


def summarize_torch_error(error: BaseException, limit: int = 400) -> str:
    """The line of a torch error a user can act on.

    TorchScript wraps the real cause after a traceback ("The following operation failed
    in the TorchScript interpreter ... RuntimeError: <cause>"): keep the cause.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    chosen = lines[-1] if lines[0].startswith("The following operation failed") else lines[0]
    for prefix in ("RuntimeError: ", "builtins.RuntimeError: "):
        chosen = chosen.removeprefix(prefix)
    return chosen[:limit]
