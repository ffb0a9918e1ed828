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


class UnsupportedModel(CompressionError):
    """The model is valid but the requested method cannot be applied to it."""

    title = "Unsupported model"
    slug = "unsupported-model"
