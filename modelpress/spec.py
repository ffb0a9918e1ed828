"""The compression spec: one marshmallow schema, used by the API to validate and by the worker to load.

Every field has a default, a range and a unit in its metadata; the README's spec reference and
the OpenAPI document are written from the same fields.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

METHODS = ("quantize", "prune", "distill")
PRUNABLE_MODULES = ("Conv2d", "Linear", "Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
QUANTIZABLE_MODULES = ("Linear", "LSTM", "GRU", "RNN", "MultiheadAttention")
MAX_INPUT_ELEMENTS = 1 << 26  # 64M floats (256 MB): bigger example inputs are a mistake or an attack
MAX_SPEC_BYTES = 64 * 1024


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class QuantizeSpec(_Strict):
    mode = fields.String(
        load_default="dynamic", validate=validate.OneOf(["dynamic"]),
        metadata={"description": "dynamic: int8 weights, activations quantized per batch at run time."},
    )
    dtype = fields.String(
        load_default="qint8", validate=validate.OneOf(["qint8", "float16"]),
        metadata={"description": "Weight type: qint8 (4x smaller, int8 kernels for Linear) or float16 (2x smaller)."},
    )
    modules = fields.List(
        fields.String(validate=validate.OneOf(QUANTIZABLE_MODULES)),
        load_default=lambda: ["Linear", "LSTM", "GRU"],
        validate=validate.Length(min=1, max=len(QUANTIZABLE_MODULES)),
        metadata={"description": "Module types whose weights are quantized."},
    )
    exclude = fields.List(
        fields.String(validate=validate.Length(min=1, max=200)),
        load_default=list, validate=validate.Length(max=200),
        metadata={"description": "Qualified-name glob patterns (fnmatch) of modules to keep in float, e.g. 'head' or 'layers.0.*'."},
    )
    per_channel = fields.Boolean(
        load_default=True, metadata={"description": "One int8 scale per output channel (true) or per tensor."}
    )


class FinetuneSpec(_Strict):
    epochs = fields.Integer(load_default=3, strict=True, validate=validate.Range(1, 200),
                            metadata={"description": "Passes over the data file (count)."})
    lr = fields.Float(load_default=1e-3, validate=validate.Range(0, 1, min_inclusive=False),
                      metadata={"description": "Adam learning rate."})
    batch_size = fields.Integer(load_default=32, strict=True, validate=validate.Range(2, 4096),
                                metadata={"description": "Samples per step (count)."})
    seed = fields.Integer(load_default=0, strict=True, validate=validate.Range(0, 2**31 - 1),
                          metadata={"description": "Seed of the shuffling."})


class PruneSpec(_Strict):
    amount = fields.Float(
        load_default=0.5, validate=validate.Range(0, 1, min_inclusive=False, max_inclusive=False),
        metadata={"description": "Fraction of weights (unstructured) or of channels per group (structured) to remove."},
    )
    structured = fields.Boolean(
        load_default=False, metadata={"description": "false: zero single weights; true: remove whole output channels."}
    )
    criterion = fields.String(load_default="l1", validate=validate.OneOf(["l1", "l2"]),
                              metadata={"description": "Norm that ranks channels (single weights rank by |w| either way)."})
    scope = fields.String(load_default="global", validate=validate.OneOf(["global", "per_layer"]),
                          metadata={"description": "Unstructured: one threshold for all layers, or amount per layer."})
    modules = fields.List(
        fields.String(validate=validate.OneOf(PRUNABLE_MODULES)), load_default=lambda: list(PRUNABLE_MODULES),
        validate=validate.Length(min=1, max=len(PRUNABLE_MODULES)),
        metadata={"description": "Module types to prune."},
    )
    exclude = fields.List(
        fields.String(validate=validate.Length(min=1, max=200)), load_default=None, allow_none=True,
        validate=validate.Length(max=200),
        metadata={"description": "Qualified-name glob patterns of modules left whole; null: the final classifier."},
    )
    finetune = fields.Nested(FinetuneSpec, allow_none=True, load_default=None,
                             metadata={"description": "Train after pruning; needs a data file."})


class StudentSpec(_Strict):
    source = fields.String(
        data_key="from", required=True, validate=validate.OneOf(["upload", "torchvision", "width"]),
        metadata={"description": "upload: the multipart part 'student'; torchvision: a model by name; "
                                 "width: the teacher with a fraction of its channels."},
    )
    arch = fields.String(validate=validate.Regexp(r"^[a-z][a-z0-9_]{1,63}$"),
                         metadata={"description": "torchvision classification model name, e.g. resnet18 (from: torchvision)."})
    width = fields.Float(validate=validate.Range(0, 1, min_inclusive=False, max_inclusive=False),
                         metadata={"description": "Fraction of the teacher's channels kept (from: width); "
                                                  "parameters shrink about as width squared."})

    @validates_schema
    def _options_match_source(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        needs = {"torchvision": "arch", "width": "width"}.get(data.get("source", ""))
        if needs and needs not in data:
            raise ValidationError(f"required when from is {data['source']!r}", needs)
        for option in ("arch", "width"):
            if option in data and option != needs:
                raise ValidationError(f"only allowed when from is {'torchvision' if option == 'arch' else 'width'!r}", option)


class DistillSpec(_Strict):
    student = fields.Nested(StudentSpec, required=True, metadata={"description": "Where the student comes from."})
    temperature = fields.Float(load_default=4.0, validate=validate.Range(0, 100, min_inclusive=False),
                               metadata={"description": "Softmax temperature T of the soft targets."})
    alpha = fields.Float(load_default=None, allow_none=True, validate=validate.Range(0, 1),
                         metadata={"description": "Weight of the soft loss; null: 0.9 with labels, and 1.0 "
                                                  "always without labels."})
    epochs = fields.Integer(load_default=10, strict=True, validate=validate.Range(1, 500),
                            metadata={"description": "Passes over the training split (count)."})
    batch_size = fields.Integer(load_default=64, strict=True, validate=validate.Range(2, 4096),
                                metadata={"description": "Samples per step (count)."})
    lr = fields.Float(load_default=1e-3, validate=validate.Range(0, 1, min_inclusive=False),
                      metadata={"description": "Learning rate."})
    optimizer = fields.String(load_default="adam", validate=validate.OneOf(["adam", "sgd"]),
                              metadata={"description": "adam, or sgd with momentum 0.9."})
    val_fraction = fields.Float(load_default=0.1, validate=validate.Range(0, 0.5, min_inclusive=False),
                                metadata={"description": "Share of the data held out for validation (fraction)."})
    early_stopping_patience = fields.Integer(
        load_default=None, allow_none=True, strict=True, validate=validate.Range(1, 500),
        metadata={"description": "Stop after this many epochs without a better validation score; null: never."})
    seed = fields.Integer(load_default=0, strict=True, validate=validate.Range(0, 2**31 - 1),
                          metadata={"description": "Seed of the split and the shuffling."})


class EvaluationSpec(_Strict):
    runs = fields.Integer(
        load_default=20, strict=True, validate=validate.Range(1, 1000),
        metadata={"description": "Timed forward passes per model; the report gives the median (count)."},
    )
    warmup = fields.Integer(
        load_default=3, strict=True, validate=validate.Range(0, 100),
        metadata={"description": "Untimed passes before timing (count)."},
    )


class CompressionSpec(_Strict):
    method = fields.String(required=True, validate=validate.OneOf(METHODS), metadata={"description": "Compression method."})
    quantize = fields.Nested(QuantizeSpec, metadata={"description": "Options of method 'quantize'."})
    prune = fields.Nested(PruneSpec, metadata={"description": "Options of method 'prune'."})
    distill = fields.Nested(DistillSpec, metadata={"description": "Options of method 'distill' (required for it)."})
    input_shape = fields.List(
        fields.Integer(strict=True, validate=validate.Range(1, 1 << 20)),
        validate=validate.Length(min=1, max=8),
        metadata={"description": "Shape of one example input batch, batch axis first, e.g. [1, 3, 224, 224]. "
                                 "Needed unless a data file is uploaded."},
    )
    seed = fields.Integer(
        load_default=0, strict=True, validate=validate.Range(0, 2**31 - 1),
        metadata={"description": "Seed of random example inputs."},
    )
    evaluation = fields.Nested(
        EvaluationSpec, load_default=lambda: EvaluationSpec().load({}),
        metadata={"description": "How latency is measured."},
    )

    @validates_schema
    def _sections_match_method(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        method = data.get("method")
        for section in METHODS:
            if section in data and section != method:
                raise ValidationError(f"only allowed when method is {section!r}", section)
        shape = data.get("input_shape")
        if shape and math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValidationError(f"at most {MAX_INPUT_ELEMENTS} elements in all", "input_shape")


class SpecError(ValueError):
    """A spec was refused; ``errors`` maps dotted field paths to messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in errors.items()))
        self.errors = errors


def parse_spec(raw: str | bytes | Mapping[str, Any], has_data: bool = False, has_student: bool = False) -> dict[str, Any]:
    """Validate a spec (JSON text or mapping) and return it with every default filled in.

    ``has_data`` and ``has_student`` say which optional files came with it. Raises ``SpecError``
    whose keys are field paths such as ``spec.quantize.dtype`` (or the file part, ``student``).
    """
    if isinstance(raw, (str, bytes)):
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError({"spec": [f"at most {MAX_SPEC_BYTES} bytes"]})
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise SpecError({"spec": [f"not valid JSON: {error}"]}) from None
    if not isinstance(raw, Mapping):
        raise SpecError({"spec": ["must be a JSON object"]})
    try:
        spec = CompressionSpec().load(raw)
    except ValidationError as error:
        raise SpecError(_flatten("spec", error.messages)) from None
    method = spec["method"]
    if method == "distill" and "distill" not in spec:
        raise SpecError({"spec.distill": ["required when method is 'distill' (at least its 'student')"]})
    if method not in spec:
        spec[method] = _SECTIONS[method]().load({})
    if method == "distill" and not has_data:
        raise SpecError({"data": ["required for distillation: an .npz or .safetensors file with 'inputs'"]})
    if not spec.get("input_shape") and not has_data:
        raise SpecError({"spec.input_shape": ["required when no data file is uploaded"]})
    if method == "prune" and spec["prune"].get("finetune") and not has_data:
        raise SpecError({"spec.prune.finetune": ["needs a data file (multipart part 'data') to train on"]})
    wants_student = method == "distill" and spec["distill"]["student"]["source"] == "upload"
    if wants_student and not has_student:
        raise SpecError({"student": ["required when spec.distill.student.from is 'upload': the TorchScript student"]})
    if has_student and not wants_student:
        raise SpecError({"student": ["only used when spec.distill.student.from is 'upload'"]})
    return spec


def dump_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The accepted spec as JSON-ready data (what the job resource shows)."""
    return CompressionSpec().dump(spec)


_SECTIONS: dict[str, type[Schema]] = {"quantize": QuantizeSpec, "prune": PruneSpec, "distill": DistillSpec}


def _flatten(prefix: str, messages: Any) -> dict[str, list[str]]:
    if isinstance(messages, Mapping):
        flat: dict[str, list[str]] = {}
        for key, value in messages.items():
            path = prefix if key == "_schema" else f"{prefix}.{key}"
            for inner_path, inner in _flatten(path, value).items():
                flat.setdefault(inner_path, []).extend(inner)
        return flat
    if isinstance(messages, list):
        return {prefix: [str(m) for m in messages]}
    return {prefix: [str(messages)]}
