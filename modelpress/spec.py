"""The compression spec: one marshmallow schema, used by the API to validate and by the worker to load.

Every field has a default, a range and a unit in its metadata; the README's spec reference and
the OpenAPI document are written from the same fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from modelpress.untrusted_json import loads_bounded

# Single methods (each with an options section of its name) are those in REGISTRY, at the end of this file.
PIPELINE, AUTO = "pipeline", "auto"  # methods made of the single ones: ordered steps, or a search
MAX_STEPS = 8
TARGET_METRICS = ("accuracy", "top1_agreement", "cosine")
TARGET_OBJECTIVES = ("size", "latency", "macs")
PACKAGES = ("program", "aoti")
PRUNABLE_MODULES = ("Conv2d", "Linear", "Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
QUANTIZABLE_MODULES = ("Linear", "LSTM", "GRU", "RNN", "MultiheadAttention")
MAX_INPUT_ELEMENTS = 1 << 26  # 64M floats (256 MB): bigger example inputs are a mistake or an attack
MAX_SPEC_BYTES = 64 * 1024
INPUT_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32")
# Random integer inputs (token ids, indices) are drawn from [low, high); a vocabulary of at least
# 100 is the common case, and a model that needs another range says so when it fails.
DEFAULT_INT_RANGE = (0, 100)
MAX_INPUTS = 16
MAX_INT_BOUND = 2**53  # int64 bounds exactly representable in JSON numbers and float64


class _Strict(Schema):
    class Meta:
        unknown = RAISE


DYNAMIC_MODULES = ("Linear", "LSTM", "GRU", "MultiheadAttention")  # the default selection of mode dynamic
STATIC_MODULES = ("Conv1d", "Conv2d", "Conv3d", "Linear")  # what mode static can quantize (all by default)
# Options of mode static and their defaults (refused in mode dynamic, where they would do nothing).
STATIC_OPTIONS = {"observer": "histogram", "reduce_range": True, "calibration_batches": 8, "min_cosine": 0.99}


class QuantizeSpec(_Strict):
    mode = fields.String(
        load_default="dynamic", validate=validate.OneOf(["dynamic", "static"]),
        metadata={"description": "dynamic: int8 weights, activations quantized per batch at run time; "
                                 "static: int8 weights and activations of conv and linear layers, calibrated on the data."},
    )
    dtype = fields.String(
        load_default="qint8", validate=validate.OneOf(["qint8", "float16"]),
        metadata={"description": "Weight type: qint8 (4x smaller, int8 kernels for Linear) or float16 (2x smaller); "
                                 "static needs qint8."},
    )
    modules = fields.List(
        fields.String(validate=validate.OneOf(sorted(set(QUANTIZABLE_MODULES) | set(STATIC_MODULES)))),
        load_default=None,
        validate=validate.Length(min=1, max=len(QUANTIZABLE_MODULES) + len(STATIC_MODULES)),
        metadata={"description": "Module types whose weights are quantized; default: Linear, LSTM, GRU (dynamic) "
                                 "or Conv1d, Conv2d, Conv3d, Linear (static)."},
    )
    exclude = fields.List(
        fields.String(validate=validate.Length(min=1, max=200)),
        load_default=list, validate=validate.Length(max=200),
        metadata={"description": "Qualified-name glob patterns (fnmatch) of modules to keep in float, e.g. 'head' or 'layers.0.*'."},
    )
    per_channel = fields.Boolean(
        load_default=True, metadata={"description": "One int8 scale per output channel (true) or per tensor."}
    )
    observer = fields.String(
        validate=validate.OneOf(["histogram", "minmax"]),
        metadata={"description": "static: how activation ranges are calibrated: histogram (minimises the "
                                 "quantization error, slower) or minmax (the observed range)."},
    )
    reduce_range = fields.Boolean(
        metadata={"description": "static: 7-bit activations, which cannot saturate fbgemm's int16 "
                                 "accumulation on CPUs without VNNI; false: full 8 bits."},
    )
    calibration_batches = fields.Integer(
        strict=True, validate=validate.Range(1, 1000),
        metadata={"description": "static: batches of 32 example rows run to calibrate the activation ranges (count)."},
    )
    min_cosine = fields.Float(
        validate=validate.Range(0, 1),
        metadata={"description": "static: fidelity floor; the layers whose quantization hurts the outputs most "
                                 "stay float until the outputs' cosine to the float model's reaches it."},
    )

    @validates_schema
    def _fits_mode(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        static = data.get("mode") == "static"
        allowed = STATIC_MODULES if static else QUANTIZABLE_MODULES
        wrong = {index: [f"{name} cannot be quantized in mode {data.get('mode')!r}; choose from {', '.join(allowed)}"]
                 for index, name in enumerate(data.get("modules") or []) if name not in allowed}
        if wrong:
            raise ValidationError({"modules": wrong})
        if static and data.get("dtype") == "float16":
            raise ValidationError("static quantization is int8 only: use qint8", "dtype")
        for option in STATIC_OPTIONS:
            if option in data and not static:
                raise ValidationError("only used when mode is 'static'", option)

    @post_load
    def _mode_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Defaults that depend on the mode (static options exist only in mode static)."""
        static = data.get("mode") == "static"
        if data.get("modules") is None:
            data["modules"] = list(STATIC_MODULES if static else DYNAMIC_MODULES)
        if static:
            for option, default in STATIC_OPTIONS.items():
                data.setdefault(option, default)
        return data


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


class InputSpec(_Strict):
    shape = fields.List(
        fields.Integer(strict=True, validate=validate.Range(1, 1 << 20)), required=True,
        validate=validate.Length(min=1, max=8),
        metadata={"description": "Shape of this input's example batch, batch axis first."},
    )
    dtype = fields.String(load_default="float32", validate=validate.OneOf(INPUT_DTYPES),
                          metadata={"description": "Element type of this input."})
    low = fields.Float(load_default=None, allow_none=True,
                       metadata={"description": "Random values from [low, high): floats uniform (default: standard "
                                                "normal), integers default [0, 100); not for bool."})
    high = fields.Float(load_default=None, allow_none=True,
                        metadata={"description": "Upper bound (exclusive) of random values; see low."})

    @validates_schema
    def _range_fits_dtype(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        dtype, low, high = data.get("dtype", "float32"), data.get("low"), data.get("high")
        given = [name for name in ("low", "high") if data.get(name) is not None]
        if dtype == "bool":
            if given:
                raise ValidationError("not allowed for bool inputs (they are random True/False)", given[0])
            return
        if dtype in INT_DTYPES:
            bound = 2**31 if dtype == "int32" else MAX_INT_BOUND
            for name in given:
                if not float(data[name]).is_integer() or abs(data[name]) > bound:
                    raise ValidationError(f"must be a whole number within +-{bound} for {dtype} inputs", name)
            low = DEFAULT_INT_RANGE[0] if low is None else low
            high = DEFAULT_INT_RANGE[1] if high is None else high
        elif len(given) == 1:
            raise ValidationError("give both low and high (uniform), or neither (standard normal)", given[0])
        if low is not None and high is not None and not low < high:
            raise ValidationError(f"must be above low ({low:g})", "high")

    @post_load
    def _integer_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return _input_defaults(data)


def _input_defaults(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An ``inputs`` entry with its defaults: float32, and [0, 100) for integers."""
    entry = {"dtype": "float32", "low": None, "high": None, **entry}
    if entry["dtype"] in INT_DTYPES:
        entry["low"] = int(DEFAULT_INT_RANGE[0] if entry["low"] is None else entry["low"])
        entry["high"] = int(DEFAULT_INT_RANGE[1] if entry["high"] is None else entry["high"])
    return entry


class OutputChoice(fields.Field):
    """Which model output training targets: an index into a tuple/list output or a key of a dict output."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int | str:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValidationError("an output index (0, 1, ...) or a dict output's key")
        if isinstance(value, int) and not 0 <= value < 1024:
            raise ValidationError("an index from 0 to 1023")
        if isinstance(value, str) and not 1 <= len(value) <= 200:
            raise ValidationError("a key of 1 to 200 characters")
        return value


class EvaluationSpec(_Strict):
    runs = fields.Integer(
        load_default=20, strict=True, validate=validate.Range(1, 1000),
        metadata={"description": "Timed forward passes per model; the report gives the median (count)."},
    )
    warmup = fields.Integer(
        load_default=3, strict=True, validate=validate.Range(0, 100),
        metadata={"description": "Untimed passes before timing (count)."},
    )
    runtime = fields.String(
        load_default="eager", validate=validate.OneOf(("eager", "compile", "aoti")),
        metadata={"description": "How a torch.export (.pt2) program is run when timed: 'eager' "
                                 "(ExportedProgram.module()), 'compile' (torch.compile of it) or 'aoti' (an "
                                 "AOTInductor package; needs a C++ compiler on the worker). TorchScript models: "
                                 "'eager' only."},
    )
    max_seconds = fields.Float(
        load_default=30.0, validate=validate.Range(min=0.1, max=3600),
        metadata={"description": "Time budget of the latency measurement of each model (seconds): warmup and timed "
                                 "passes stop once it is spent, after at least one timed pass; the report says how "
                                 "many ran."},
    )


class StepSpec(_Strict):
    """One step of a pipeline: a single method and its options, validated as a spec of that method would be."""

    method = fields.String(required=True, metadata={"description": "This step's method."})  # choices: register_method

    @validates_schema
    def _section_matches_method(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        _check_sections(data)

    @post_load
    def _default_section(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        entry = REGISTRY[data["method"]]
        if entry.name not in data and not entry.options_required:
            data[entry.name] = entry.options().load({})
        return data


class TargetSpec(_Strict):
    metric = fields.String(
        required=True, validate=validate.OneOf(TARGET_METRICS),
        metadata={"description": "What the target is about, measured on held-out rows of the data file: accuracy "
                                 "(needs labels), top1_agreement or cosine (of the outputs to the original's)."},
    )
    max_drop = fields.Float(
        validate=validate.Range(0, 1),
        metadata={"description": "Largest allowed fall of the metric below the original model's (absolute; "
                                 "0.01 = one point of accuracy). Give max_drop or min."},
    )
    min = fields.Float(validate=validate.Range(0, 1), metadata={"description": "Lowest allowed value of the metric."})
    objective = fields.String(
        load_default="size", validate=validate.OneOf(TARGET_OBJECTIVES),
        metadata={"description": "What the best candidate that meets the target minimises: file size, median "
                                 "latency or multiply-accumulates."},
    )

    @validates_schema
    def _one_bound(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if ("max_drop" in data) == ("min" in data):
            raise ValidationError("give exactly one of max_drop or min", "max_drop" if "max_drop" in data else "_schema")


class SearchSpec(_Strict):
    max_trials = fields.Integer(load_default=8, strict=True, validate=validate.Range(1, 50),
                                metadata={"description": "Candidates tried at most (count)."})
    time_budget_s = fields.Integer(
        load_default=900, strict=True, validate=validate.Range(10, 86400),
        metadata={"description": "No new candidate is started after this many seconds of searching."})
    holdout = fields.Float(
        load_default=0.2, validate=validate.Range(0.05, 0.5),
        metadata={"description": "Share of the data file's rows held out: no training or calibration sees them, "
                                 "every candidate is judged on them (fraction)."})
    seed = fields.Integer(load_default=0, strict=True, validate=validate.Range(0, 2**31 - 1),
                          metadata={"description": "Seed of the hold-out split."})


class CompressionSpec(_Strict):
    method = fields.String(required=True, metadata={"description": "Compression method."})  # choices: register_method
    steps = fields.List(
        fields.Nested(StepSpec), validate=validate.Length(min=1, max=MAX_STEPS),
        metadata={"description": "method pipeline: the steps in order, each {\"method\": ..., <method>: {...}}; "
                                 "each step's output model is the next one's input."},
    )
    target = fields.Nested(TargetSpec, metadata={
        "description": "methods auto (required) and pipeline: the result must keep this metric; the search returns "
                       "the best candidate that does."})
    search = fields.Nested(SearchSpec, metadata={"description": "How the search toward target runs (with target only)."})
    input_shape = fields.List(
        fields.Integer(strict=True, validate=validate.Range(1, 1 << 20)),
        validate=validate.Length(min=1, max=8),
        metadata={"description": "Shape of one example input batch, batch axis first, e.g. [1, 3, 224, 224]. "
                                 "Needed unless a data file is uploaded."},
    )
    inputs = fields.List(
        fields.Nested(InputSpec), validate=validate.Length(min=1, max=MAX_INPUTS),
        metadata={"description": "One entry per positional input of forward (instead of input_shape, which "
                                 "means one float32 input)."},
    )
    output = OutputChoice(
        load_default=None, allow_none=True,
        metadata={"description": "The output fine-tuning and distillation train on: an index into a tuple/list "
                                 "output or a dict output's key; null: the first tensor.",
                  "oneOf": [{"type": "integer", "minimum": 0, "maximum": 1023},
                            {"type": "string", "minLength": 1, "maxLength": 200}]},
    )
    seed = fields.Integer(
        load_default=0, strict=True, validate=validate.Range(0, 2**31 - 1),
        metadata={"description": "Seed of random example inputs."},
    )
    evaluation = fields.Nested(
        EvaluationSpec, load_default=lambda: EvaluationSpec().load({}),
        metadata={"description": "How latency is measured."},
    )
    time_limit_s = fields.Integer(
        strict=True, validate=validate.Range(min=1),
        metadata={"description": "The job's wall-clock limit, to lower the operator's (MODELPRESS_JOB_TIMEOUT_S, "
                                 "also the default and the most a spec may ask for); the job fails job-timeout "
                                 "when it is reached (seconds)."},
    )
    package = fields.String(
        load_default="program", validate=validate.OneOf(PACKAGES),
        metadata={"description": "What a .pt2 upload's download holds: 'program' (a torch.export program; "
                                 "torch.export.load) or 'aoti' (the result compiled ahead of time by AOTInductor on "
                                 "the worker, for the worker's CPU: torch._inductor.aoti_load_package; needs a C++ "
                                 "compiler on the worker). TorchScript uploads: 'program' only."},
    )

    @validates_schema
    def _sections_match_method(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        _check_sections(data)
        method = data.get("method")
        if method == PIPELINE and "steps" not in data:
            raise ValidationError("required when method is 'pipeline': the steps in order", "steps")
        if "steps" in data and method != PIPELINE:
            raise ValidationError("only allowed when method is 'pipeline'", "steps")
        if method == AUTO and "target" not in data:
            raise ValidationError("required when method is 'auto': what the result must keep", "target")
        if "target" in data and method not in (PIPELINE, AUTO):
            raise ValidationError("only allowed when method is 'pipeline' or 'auto'", "target")
        if "search" in data and "target" not in data:
            raise ValidationError("only allowed with a target", "search")
        shape = data.get("input_shape")
        if shape and math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValidationError(f"at most {MAX_INPUT_ELEMENTS} elements in all", "input_shape")
        inputs = data.get("inputs")
        if inputs and shape:
            raise ValidationError("give either input_shape (one float32 input) or inputs, not both", "inputs")
        if inputs:
            if sum(math.prod(entry["shape"]) for entry in inputs) > MAX_INPUT_ELEMENTS:
                raise ValidationError(f"at most {MAX_INPUT_ELEMENTS} elements in all inputs together", "inputs")
            batches = {entry["shape"][0] for entry in inputs}
            if len(batches) > 1:
                raise ValidationError("every input's first axis is the batch axis, so they must agree: got "
                                      f"{', '.join(str(entry['shape'][0]) for entry in inputs)}", "inputs")


def _check_sections(data: Mapping[str, Any]) -> None:
    """Only the chosen single method's options section may appear."""
    for section in REGISTRY:
        if section in data and section != data.get("method"):
            raise ValidationError(f"only allowed when method is {section!r}", section)


class SpecError(ValueError):
    """A spec was refused; ``errors`` maps dotted field paths to messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in errors.items()))
        self.errors = errors


def parse_spec(raw: str | bytes | Mapping[str, Any], has_data: bool = False, has_student: bool = False,
               max_time_limit_s: int | None = None) -> dict[str, Any]:
    """Validate a spec (JSON text or mapping) and return it with every default filled in.

    ``has_data`` and ``has_student`` say which optional files came with it; ``max_time_limit_s``
    is the operator's job time limit, above which ``time_limit_s`` is refused. Raises ``SpecError``
    whose keys are field paths such as ``spec.quantize.dtype`` (or the file part, ``student``).
    """
    if isinstance(raw, (str, bytes)):
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError({"spec": [f"at most {MAX_SPEC_BYTES} bytes"]})
        try:
            raw = loads_bounded(raw)  # a 20,000-deep array is refused, not a RecursionError
        except (ValueError, UnicodeDecodeError) as error:
            raise SpecError({"spec": [f"not valid JSON: {error}"]}) from None
    if not isinstance(raw, Mapping):
        raise SpecError({"spec": ["must be a JSON object"]})
    try:
        spec = CompressionSpec().load(raw)
    except ValidationError as error:
        raise SpecError(_flatten("spec", error.messages)) from None
    if max_time_limit_s is not None and spec.get("time_limit_s", 0) > max_time_limit_s:
        raise SpecError({"spec.time_limit_s": [f"at most {max_time_limit_s} (this service's job time limit, "
                                               "MODELPRESS_JOB_TIMEOUT_S)"]})
    method = spec["method"]
    if method in REGISTRY and method not in spec:
        if REGISTRY[method].options_required:
            raise SpecError({f"spec.{method}": [f"required when method is {method!r}"
                                                + (" (at least its 'student')" if method == "distill" else "")]})
        spec[method] = REGISTRY[method].options().load({})
    if "target" in spec:
        if not has_data:
            raise SpecError({"data": ["required with a target: the search holds out part of the data file to judge "
                                      "every candidate on"]})
        spec["search"] = spec.get("search") or SearchSpec().load({})
    uploads = []  # where an uploaded student is wanted
    for path, step in method_steps(spec):
        if step["method"] == "distill" and "distill" not in step:
            raise SpecError({f"{path}.distill": ["required when method is 'distill' (at least its 'student')"]})
        if step["method"] == "distill" and not has_data:
            raise SpecError({"data": ["required for distillation: an .npz or .safetensors file with 'inputs'"]})
        if step["method"] == "prune" and step["prune"].get("finetune") and not has_data:
            raise SpecError({f"{path}.prune.finetune": ["needs a data file (multipart part 'data') to train on"]})
        if step["method"] == "distill" and step["distill"]["student"]["source"] == "upload":
            uploads.append(f"{path}.distill.student.from")
    if not spec.get("input_shape") and not spec.get("inputs") and not has_data:
        raise SpecError({"spec.input_shape": ["required (or spec.inputs) when no data file is uploaded"]})
    if len(uploads) > 1:
        raise SpecError({uploads[1]: ["only one step can use the uploaded student"]})
    if uploads and not has_student:
        raise SpecError({"student": [f"required when {uploads[0]} is 'upload': the TorchScript student"]})
    if has_student and not uploads:
        raise SpecError({"student": ["only used when spec.distill.student.from is 'upload'"]})
    return spec


def method_steps(spec: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The single-method steps a spec runs, with the field path of each: the spec itself, or its pipeline's steps.

    A step is ``{"method": name, name: {options}}``, as a single-method spec is.
    """
    if spec.get("method") == PIPELINE:
        return [(f"spec.steps.{index}", step) for index, step in enumerate(spec.get("steps") or [])]
    if spec.get("method") in REGISTRY:
        return [("spec", spec)]
    return []


def target_conflicts(spec: Mapping[str, Any], has_labels: bool) -> dict[str, list[str]]:
    """A target the data file cannot judge: accuracy without labels."""
    if (spec.get("target") or {}).get("metric") == "accuracy" and not has_labels:
        return {"spec.target.metric": ["accuracy needs a 'labels' array in the data file; use top1_agreement or "
                                       "cosine to compare with the original's outputs instead"]}
    return {}


def declared_inputs(spec: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The spec's example inputs as ``inputs`` entries (``input_shape`` is one float32 input), or None.

    Defaults are filled here too, for callers of the engine that pass a spec they did not load.
    """
    if spec.get("inputs"):
        return [_input_defaults(entry) for entry in spec["inputs"]]
    if spec.get("input_shape"):
        return [{"shape": list(spec["input_shape"]), "dtype": "float32", "low": None, "high": None}]
    return None


def dump_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The accepted spec as JSON-ready data (what the job resource shows)."""
    return CompressionSpec().dump(spec)


# ---------------------------------------------------------------------------- the method registry


@dataclass(frozen=True)
class CliFlag:
    """``modelpress submit --<method> VALUE``: ``options`` turns the value (and the other arguments) into options."""

    metavar: str
    help: str
    options: Callable[[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class MethodEntry:
    """Everything that names a single method, in one place: the spec (its options section, validated here
    and in pipeline steps), the engine's entry (``module:function``, imported by the worker only), the
    command line's flag and the README section that documents it."""

    name: str
    options: type[Schema]
    engine: str
    readme_section: str
    cli: CliFlag | None = None
    options_required: bool = False  # no usable default options (distill needs its student)


REGISTRY: dict[str, MethodEntry] = {}


def register_method(entry: MethodEntry) -> None:
    """Add a single method: its options section and its name join the spec schema (and thus the API's
    validation, the OpenAPI document and the console's form), pipeline steps, the engine and the CLI."""
    REGISTRY[entry.name] = entry
    suffix = " (required for it)" if entry.options_required else ""
    for schema, composite in ((StepSpec, ()), (CompressionSpec, (PIPELINE, AUTO))):
        declared = dict(schema._declared_fields)
        declared["method"] = fields.String(
            required=True, validate=validate.OneOf((*REGISTRY, *composite)),
            metadata={"description": "Compression method: a single one" + (
                ", a pipeline of them (steps), or auto (a search toward target)." if composite else ".")})
        declared[entry.name] = fields.Nested(
            entry.options, metadata={"description": f"Options of method {entry.name!r}{suffix}."})
        # Method sections right after the method (the order the form and the README show).
        order = ["method", *REGISTRY, *(name for name in declared if name != "method" and name not in REGISTRY)]
        schema._declared_fields = {name: declared[name] for name in order}


def filled_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A method's options with every default filled, also for callers of the engine that give only some."""
    schema = REGISTRY[method].options()
    return schema.load(schema.dump(options))


def _quantize_flag(value: str, args: Any) -> dict[str, Any]:
    dtype = {"dynamic": "qint8", "int8": "qint8", "qint8": "qint8", "float16": "float16", "static": "qint8"}.get(value)
    if dtype is None:
        raise ValueError("--quantize takes dynamic (int8), float16 or static")
    return {"mode": "static" if value == "static" else "dynamic", "dtype": dtype}


def _prune_flag(value: str, args: Any) -> dict[str, Any]:
    return {"amount": float(value), "structured": bool(getattr(args, "structured", False))}


def _distill_flag(value: str, args: Any) -> dict[str, Any]:
    kind, _, rest = value.partition("=")
    student = {"width": lambda: {"from": "width", "width": float(rest)},
               "torchvision": lambda: {"from": "torchvision", "arch": rest},
               "upload": lambda: {"from": "upload"}}.get(kind)
    if student is None:
        raise ValueError("--distill takes width=FRACTION, torchvision=ARCH or upload")
    return {"student": student()}


for _entry in (
    MethodEntry("quantize", QuantizeSpec, "workers.engine.methods.quantize.torchscript:quantize", "Spec reference",
                CliFlag("dynamic|float16|static", "dynamic quantization, or static int8 (calibrated on --data) instead of --spec",
                        _quantize_flag)),
    MethodEntry("prune", PruneSpec, "workers.engine.methods.prune.torchscript:prune", "Spec reference",
                CliFlag("AMOUNT", "pruning amount (0..1) instead of --spec", _prune_flag)),
    MethodEntry("distill", DistillSpec, "workers.engine.methods.distill.torchscript:distill", "Spec reference",
                CliFlag("width=F|torchvision=ARCH|upload", "distillation instead of --spec", _distill_flag),
                options_required=True),
):
    register_method(_entry)


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
