"""The options sections of the spec: each single method's (quantize, prune, distill), and a search's
target and budget. One marshmallow schema each.

``modelpress.spec`` builds the whole spec from these and registers each method with its schema
(``register_method``); the API validates with them, the worker reloads the stored spec with them,
and the OpenAPI document, the console's form and the spec reference page are generated from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

PRUNABLE_MODULES = ("Conv2d", "Linear", "Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
QUANTIZABLE_MODULES = ("Linear", "LSTM", "GRU", "RNN", "MultiheadAttention", "Embedding", "EmbeddingBag")


class Strict(Schema):
    """Unknown fields are refused, not ignored (a typo in a spec is a 422 naming it)."""

    class Meta:
        unknown = RAISE


# The default selection of mode dynamic (Embedding/EmbeddingBag: int8 rows, weight-only; dtype float16: half rows).
DYNAMIC_MODULES = ("Linear", "LSTM", "GRU", "MultiheadAttention", "Embedding", "EmbeddingBag")
STATIC_MODULES = ("Conv1d", "Conv2d", "Conv3d", "Linear")  # what mode static can quantize (all by default)
# Options of mode static and their defaults (refused in mode dynamic, where they would do nothing).
STATIC_OPTIONS = {"observer": "histogram", "reduce_range": True, "calibration_batches": 8, "min_cosine": 0.99}


class FinetuneSpec(Strict):
    epochs = fields.Integer(
        load_default=3,
        strict=True,
        validate=validate.Range(1, 200),
        metadata={"description": "Passes over the data file (count)."},
    )
    lr = fields.Float(
        load_default=1e-3,
        validate=validate.Range(0, 1, min_inclusive=False),
        metadata={"description": "Adam learning rate."},
    )
    batch_size = fields.Integer(
        load_default=32,
        strict=True,
        validate=validate.Range(2, 4096),
        metadata={"description": "Samples per step (count)."},
    )
    seed = fields.Integer(
        load_default=0,
        strict=True,
        validate=validate.Range(0, 2**31 - 1),
        metadata={"description": "Seed of the shuffling."},
    )


class QatSpec(FinetuneSpec):
    """The training of mode qat: as fine-tuning, with a smaller learning rate by default."""

    lr = fields.Float(
        load_default=1e-4,
        validate=validate.Range(0, 1, min_inclusive=False),
        metadata={"description": "Adam learning rate."},
    )


class QuantizeSpec(Strict):
    mode = fields.String(
        load_default="dynamic",
        validate=validate.OneOf(["dynamic", "static", "qat"]),
        metadata={
            "description": "dynamic: int8 weights, activations quantized per batch at run time; "
            "static: int8 weights and activations of conv and linear layers, calibrated on the "
            "data; qat: static after quantization-aware training on the data file (needs one)."
        },
    )
    dtype = fields.String(
        load_default="qint8",
        validate=validate.OneOf(["qint8", "float16"]),
        metadata={
            "description": "Weight type: qint8 (4x smaller, int8 kernels for Linear) or float16 (2x smaller); "
            "static needs qint8."
        },
    )
    modules = fields.List(
        fields.String(validate=validate.OneOf(sorted(set(QUANTIZABLE_MODULES) | set(STATIC_MODULES)))),
        load_default=None,
        validate=validate.Length(min=1, max=len(QUANTIZABLE_MODULES) + len(STATIC_MODULES)),
        metadata={
            "description": "Module types whose weights are quantized; default: Linear, LSTM, GRU, "
            "MultiheadAttention, Embedding, EmbeddingBag (dynamic) or Conv1d, Conv2d, Conv3d, "
            "Linear (static). Linear covers every spelling of a linear layer (addmm/matmul with "
            "a weight parameter, e.g. GPT-2's Conv1D); Embedding tables get int8 rows."
        },
    )
    exclude = fields.List(
        fields.String(validate=validate.Length(min=1, max=200)),
        load_default=list,
        validate=validate.Length(max=200),
        metadata={
            "description": "Qualified-name glob patterns (fnmatch) of modules to keep in float, e.g. 'head' or 'layers.0.*'."
        },
    )
    per_channel = fields.Boolean(
        load_default=True, metadata={"description": "One int8 scale per output channel (true) or per tensor."}
    )
    observer = fields.String(
        validate=validate.OneOf(["histogram", "minmax"]),
        metadata={
            "description": "static: how activation ranges are calibrated: histogram (minimises the "
            "quantization error, slower) or minmax (the observed range)."
        },
    )
    reduce_range = fields.Boolean(
        metadata={
            "description": "static: 7-bit activations, which cannot saturate fbgemm's int16 "
            "accumulation on CPUs without VNNI; false: full 8 bits."
        },
    )
    calibration_batches = fields.Integer(
        strict=True,
        validate=validate.Range(1, 1000),
        metadata={"description": "static: batches of 32 example rows run to calibrate the activation ranges (count)."},
    )
    min_cosine = fields.Float(
        validate=validate.Range(0, 1),
        metadata={
            "description": "static: fidelity floor; the layers whose quantization hurts the outputs most "
            "stay float until the outputs' cosine to the float model's reaches it."
        },
    )
    qat = fields.Nested(
        QatSpec,
        load_default=None,
        allow_none=True,
        metadata={
            "description": "qat: the training (epochs, lr, batch_size, seed); the static "
            "options above apply to the int8 result."
        },
    )

    @validates_schema
    def _fits_mode(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        static = data.get("mode") in ("static", "qat")
        allowed = STATIC_MODULES if static else QUANTIZABLE_MODULES
        wrong = {
            index: [f"{name} cannot be quantized in mode {data.get('mode')!r}; choose from {', '.join(allowed)}"]
            for index, name in enumerate(data.get("modules") or [])
            if name not in allowed
        }
        if wrong:
            raise ValidationError({"modules": wrong})
        if static and data.get("dtype") == "float16":
            raise ValidationError(f"{data.get('mode')} quantization is int8 only: use qint8", "dtype")
        for option in STATIC_OPTIONS:
            if option in data and not static:
                raise ValidationError("only used when mode is 'static' or 'qat'", option)
        if data.get("qat") is not None and data.get("mode") != "qat":
            raise ValidationError("only used when mode is 'qat'", "qat")

    @post_load
    def _mode_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Defaults that depend on the mode (static options exist only in mode static)."""
        static = data.get("mode") in ("static", "qat")
        if data.get("modules") is None:
            data["modules"] = list(STATIC_MODULES if static else DYNAMIC_MODULES)
        if static:
            for option, default in STATIC_OPTIONS.items():
                data.setdefault(option, default)
        if data.get("mode") == "qat" and data.get("qat") is None:
            data["qat"] = QatSpec().load({})
        elif data.get("qat") is None:
            data.pop("qat", None)  # a section of mode qat only: absent elsewhere, like the static options
        return data


NORMS = ("l1", "l2")
TRAINED_IMPORTANCES = ("bn_scale", "group_lasso")  # importances learnt in a sparsity-training phase
IMPORTANCES = NORMS + TRAINED_IMPORTANCES
SCHEDULE_CURVES = ("cubic", "linear")


class RegularizeSpec(Strict):
    strength = fields.Float(
        load_default=1e-2,
        validate=validate.Range(0, 10, min_inclusive=False),
        metadata={
            "description": "Weight of the penalty added to the training loss: strength x the sum of |BatchNorm "
            "scale| (bn_scale) or of each channel's L2 norm over its group's slices "
            "(group_lasso)."
        },
    )
    epochs = fields.Integer(
        load_default=3,
        strict=True,
        validate=validate.Range(1, 200),
        metadata={"description": "Passes over the data file with the penalty (count)."},
    )
    lr = fields.Float(
        load_default=1e-2,
        validate=validate.Range(0, 1, min_inclusive=False),
        metadata={
            "description": "Adam learning rate of the sparsity phase (higher than fine-tuning's: Adam moves a "
            "weight by at most about lr a step, and a scale near 1 must travel to near 0 in a few "
            "epochs); batch size and seed are finetune's (or its defaults)."
        },
    )


class PruneScheduleSpec(Strict):
    steps = fields.Integer(
        load_default=3,
        strict=True,
        validate=validate.Range(2, 20),
        metadata={"description": "Pruning steps to reach amount (count)."},
    )
    curve = fields.String(
        load_default="cubic",
        validate=validate.OneOf(SCHEDULE_CURVES),
        metadata={
            "description": "The amount after step t of k: cubic, amount x (1 - (1 - t/k)^3) (Zhu & Gupta: "
            "big steps first, small ones near the end), or linear, amount x t/k."
        },
    )


class PruneSpec(Strict):
    amount = fields.Float(
        load_default=0.5,
        validate=validate.Range(0, 1, min_inclusive=False, max_inclusive=False),
        metadata={"description": "Fraction of weights (unstructured) or of channels per group (structured) to remove."},
    )
    structured = fields.Boolean(
        load_default=False, metadata={"description": "false: zero single weights; true: remove whole output channels."}
    )
    criterion = fields.String(
        load_default=None,
        validate=validate.OneOf(NORMS),
        metadata={
            "description": "Norm that ranks channels (single weights rank by |w| either way): "
            "the older spelling of importance l1 / l2, filled in equal to it "
            "(null: l1, or importance's norm)."
        },
    )
    importance = fields.String(
        load_default=None,
        validate=validate.OneOf(IMPORTANCES),
        metadata={
            "description": "What ranks channels (null: criterion's norm, l1 by default): l1 / l2 (the norm of "
            "their weights), bn_scale (|scale| of the BatchNorm after the conv making them, after "
            "a sparsity-training phase with an L1 penalty on those scales) or group_lasso (each "
            "channel's L2 norm over every tensor slice of its group, after a phase penalising "
            "that norm); the last two are structured only and need a data file."
        },
    )
    scope = fields.String(
        load_default="global",
        validate=validate.OneOf(["global", "per_layer"]),
        metadata={"description": "Unstructured: one threshold for all layers, or amount per layer."},
    )
    modules = fields.List(
        fields.String(validate=validate.OneOf(PRUNABLE_MODULES)),
        load_default=lambda: list(PRUNABLE_MODULES),
        validate=validate.Length(min=1, max=len(PRUNABLE_MODULES)),
        metadata={"description": "Module types to prune."},
    )
    exclude = fields.List(
        fields.String(validate=validate.Length(min=1, max=200)),
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=200),
        metadata={"description": "Qualified-name glob patterns of modules left whole; null: the final classifier."},
    )
    finetune = fields.Nested(
        FinetuneSpec,
        allow_none=True,
        load_default=None,
        metadata={"description": "Train after pruning; needs a data file."},
    )
    regularize = fields.Nested(
        RegularizeSpec,
        allow_none=True,
        load_default=None,
        metadata={
            "description": "The sparsity-training phase of importance bn_scale / group_lasso, before ranking "
            "(filled with its defaults for them; refused for l1 / l2)."
        },
    )
    schedule = fields.Nested(
        PruneScheduleSpec,
        allow_none=True,
        load_default=None,
        metadata={
            "description": "Reach amount in steps, fine-tuning between them; finetune.epochs is split across "
            "the steps (needs finetune)."
        },
    )

    @validates_schema
    def _options_fit(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        importance, criterion = data.get("importance"), data.get("criterion")
        trained = importance in TRAINED_IMPORTANCES
        if importance in NORMS and criterion is not None and criterion != importance:
            raise ValidationError(
                f"contradicts criterion {criterion!r} (criterion is the older name of the "
                "l1 / l2 importance): give one of them",
                "importance",
            )
        if trained and not data.get("structured"):
            raise ValidationError(
                f"{importance} ranks channels: only with structured: true (single weights rank by |w|)", "importance"
            )
        if data.get("regularize") is not None:
            if not data.get("structured"):
                raise ValidationError(
                    "only with structured: true (it trains the channel importance bn_scale / group_lasso rank by)",
                    "regularize",
                )
            if not trained:
                raise ValidationError(
                    "only with importance bn_scale or group_lasso (l1 / l2 rank the weights as they are)", "regularize"
                )
        schedule, finetune = data.get("schedule"), data.get("finetune")
        if schedule is not None:
            if finetune is None:
                raise ValidationError(
                    "needs finetune: the model is fine-tuned between the steps, finetune.epochs split across them",
                    "schedule",
                )
            if schedule.get("steps", 0) > finetune.get("epochs", 0):
                raise ValidationError(
                    {
                        "schedule": {
                            "steps": [
                                f"at most finetune.epochs ({finetune.get('epochs')}): each step fine-tunes at least one epoch"
                            ]
                        }
                    }
                )

    @post_load
    def _importance_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """importance and criterion agree (either may be given); a trained importance gets its phase (defaults)."""
        importance = data.get("importance") or data.get("criterion") or "l1"
        data["importance"] = importance
        if importance in NORMS:
            data["criterion"] = importance
        else:
            data["criterion"] = data.get("criterion") or "l1"
        if importance in TRAINED_IMPORTANCES and data.get("regularize") is None:
            data["regularize"] = RegularizeSpec().load({})
        return data


class StudentSpec(Strict):
    source = fields.String(
        data_key="from",
        required=True,
        validate=validate.OneOf(["upload", "torchvision", "width"]),
        metadata={
            "description": "upload: the multipart part 'student'; torchvision: a model by name; "
            "width: the teacher with a fraction of its channels."
        },
    )
    arch = fields.String(
        validate=validate.Regexp(r"^[a-z][a-z0-9_]{1,63}$"),
        metadata={"description": "torchvision classification model name, e.g. resnet18 (from: torchvision)."},
    )
    width = fields.Float(
        validate=validate.Range(0, 1, min_inclusive=False, max_inclusive=False),
        metadata={
            "description": "Fraction of the teacher's channels kept (from: width); "
            "parameters shrink about as width squared."
        },
    )

    @validates_schema
    def _options_match_source(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        needs = {"torchvision": "arch", "width": "width"}.get(data.get("source", ""))
        if needs and needs not in data:
            raise ValidationError(f"required when from is {data['source']!r}", needs)
        for option in ("arch", "width"):
            if option in data and option != needs:
                raise ValidationError(
                    f"only allowed when from is {'torchvision' if option == 'arch' else 'width'!r}", option
                )


# A module's qualified name in the model (``features.3``, ``layer2.1.conv2``): names of hint layers.
MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"
MAX_HINT_PAIRS = 16


class FeaturesSpec(Strict):
    pairs = fields.List(
        fields.List(
            fields.String(
                validate=[
                    validate.Length(max=200),
                    validate.Regexp(MODULE_NAME, error="a module's qualified name, e.g. layer2.1.conv2"),
                ]
            ),
            validate=validate.Length(min=2, max=2, error="a pair: [student layer, teacher layer]"),
        ),
        load_default=None,
        validate=validate.Length(min=1, max=MAX_HINT_PAIRS),
        metadata={
            "description": "[student layer, teacher layer] pairs of module names whose outputs are compared, "
            'e.g. [["layer3", "layer3"]]; required unless student.from is \'width\'. null: '
            "a width student's layers are matched automatically (the last conv of each "
            "stage, see the distill page)."
        },
    )
    weight = fields.Float(
        load_default=1.0,
        validate=validate.Range(0, 100, min_inclusive=False),
        metadata={
            "description": "Weight of the hint loss added to the logit loss; the hint loss is the mean over "
            "the pairs of the squared error between the projected student features and the "
            "teacher's, divided by the teacher features' mean square."
        },
    )


class DistillScheduleSpec(Strict):
    steps = fields.Integer(
        load_default=2,
        strict=True,
        validate=validate.Range(2, 8),
        metadata={
            "description": "Students trained in turn, each narrower and distilled from the one before; "
            "widths are spaced geometrically from the teacher to student.width, and the "
            "epochs are split among them (count)."
        },
    )


class DistillSpec(Strict):
    student = fields.Nested(StudentSpec, required=True, metadata={"description": "Where the student comes from."})
    temperature = fields.Float(
        load_default=4.0,
        validate=validate.Range(0, 100, min_inclusive=False),
        metadata={"description": "Softmax temperature T of the soft targets."},
    )
    alpha = fields.Float(
        load_default=None,
        allow_none=True,
        validate=validate.Range(0, 1),
        metadata={"description": "Weight of the soft loss; null: 0.9 with labels, and 1.0 always without labels."},
    )
    epochs = fields.Integer(
        load_default=10,
        strict=True,
        validate=validate.Range(1, 500),
        metadata={"description": "Passes over the training split (count)."},
    )
    batch_size = fields.Integer(
        load_default=64,
        strict=True,
        validate=validate.Range(2, 4096),
        metadata={"description": "Samples per step (count)."},
    )
    lr = fields.Float(
        load_default=1e-3,
        validate=validate.Range(0, 1, min_inclusive=False),
        metadata={"description": "Learning rate."},
    )
    optimizer = fields.String(
        load_default="adam",
        validate=validate.OneOf(["adam", "sgd"]),
        metadata={"description": "adam, or sgd with momentum 0.9."},
    )
    val_fraction = fields.Float(
        load_default=0.1,
        validate=validate.Range(0, 0.5, min_inclusive=False),
        metadata={"description": "Share of the data held out for validation (fraction)."},
    )
    early_stopping_patience = fields.Integer(
        load_default=None,
        allow_none=True,
        strict=True,
        validate=validate.Range(1, 500),
        metadata={"description": "Stop after this many epochs without a better validation score; null: never."},
    )
    seed = fields.Integer(
        load_default=0,
        strict=True,
        validate=validate.Range(0, 2**31 - 1),
        metadata={"description": "Seed of the split and the shuffling."},
    )
    features = fields.Nested(
        FeaturesSpec,
        load_default=None,
        metadata={
            "description": "Hint losses between intermediate activations, added to the logit loss; a "
            "learned 1x1 projection maps each student feature to the teacher's width during "
            "training and is dropped after. TorchScript models only."
        },
    )
    schedule = fields.Nested(
        DistillScheduleSpec,
        load_default=None,
        metadata={
            "description": "Narrow a width student step by step (teacher -> assistant -> student), within "
            "the same epochs. TorchScript models only; student.from 'width' only."
        },
    )

    @validates_schema
    def _training_options_fit_the_student(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        source = (data.get("student") or {}).get("source")
        features, schedule = data.get("features"), data.get("schedule")
        if schedule is not None and source != "width":
            raise ValidationError(
                "only for a width student (student.from 'width'): the schedule narrows the teacher step by step",
                "schedule",
            )
        if schedule is not None and schedule["steps"] > data.get("epochs", 10):
            raise ValidationError(
                {
                    "schedule": {
                        "steps": [f"at most epochs ({data.get('epochs', 10)}): every step trains at least one epoch"]
                    }
                }
            )
        if features is None:
            return
        pairs = features.get("pairs")
        if pairs is None and source is not None and source != "width":
            raise ValidationError(
                {
                    "features": {
                        "pairs": [
                            f"required when student.from is {source!r}: name the [student layer, teacher layer] pairs (only a "
                            "width student's layers are matched automatically)"
                        ]
                    }
                }
            )
        if pairs is not None and len({tuple(pair) for pair in pairs}) != len(pairs):
            raise ValidationError({"features": {"pairs": ["each pair at most once"]}})


# The command line's flag of each method (``modelpress submit --quantize static``): its value as options.
def quantize_flag(value: str, args: Any) -> dict[str, Any]:
    dtype = {
        "dynamic": "qint8",
        "int8": "qint8",
        "qint8": "qint8",
        "float16": "float16",
        "static": "qint8",
        "qat": "qint8",
    }.get(value)
    if dtype is None:
        raise ValueError("--quantize takes dynamic (int8), float16, static or qat")
    return {"mode": value if value in ("static", "qat") else "dynamic", "dtype": dtype}


def prune_flag(value: str, args: Any) -> dict[str, Any]:
    return {"amount": float(value), "structured": bool(getattr(args, "structured", False))}


def distill_flag(value: str, args: Any) -> dict[str, Any]:
    kind, _, rest = value.partition("=")
    student = {
        "width": lambda: {"from": "width", "width": float(rest)},
        "torchvision": lambda: {"from": "torchvision", "arch": rest},
        "upload": lambda: {"from": "upload"},
    }.get(kind)
    if student is None:
        raise ValueError("--distill takes width=FRACTION, torchvision=ARCH or upload")
    return {"student": student()}


# ---------------------------------------------------------------------------- a search's target and budget

TARGET_METRICS = ("accuracy", "top1_agreement", "cosine")
TARGET_OBJECTIVES = ("size", "latency", "macs")
# What a latency search times candidates on: the job's own format in PyTorch, or an export target's runtime.
SEARCH_RUNTIMES = {"torchscript": None, "onnxruntime": "onnx", "openvino": "openvino", "executorch": "executorch"}


class TargetSpec(Strict):
    metric = fields.String(
        required=True,
        validate=validate.OneOf(TARGET_METRICS),
        metadata={
            "description": "What the target is about, measured on held-out rows of the data file: accuracy "
            "(needs labels), top1_agreement or cosine (of the outputs to the original's)."
        },
    )
    max_drop = fields.Float(
        validate=validate.Range(0, 1),
        metadata={
            "description": "Largest allowed fall of the metric below the original model's (absolute; "
            "0.01 = one point of accuracy). Give max_drop or min."
        },
    )
    min = fields.Float(validate=validate.Range(0, 1), metadata={"description": "Lowest allowed value of the metric."})
    objective = fields.String(
        load_default="size",
        validate=validate.OneOf(TARGET_OBJECTIVES),
        metadata={
            "description": "What the best candidate that meets the target minimises: file size, median "
            "latency or multiply-accumulates."
        },
    )
    runtime = fields.String(
        load_default="torchscript",
        validate=validate.OneOf(SEARCH_RUNTIMES),
        metadata={
            "description": "With objective latency: the runtime every candidate is timed on. 'torchscript': "
            "the job's own format in PyTorch (TorchScript or the .pt2 program); 'onnxruntime', "
            "'openvino', 'executorch': each candidate is exported to that runtime (int8 by its "
            "own tooling) and timed there, and the chosen one's artifact comes with the result."
        },
    )

    @validates_schema
    def _one_bound(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if ("max_drop" in data) == ("min" in data):
            raise ValidationError(
                "give exactly one of max_drop or min", "max_drop" if "max_drop" in data else "_schema"
            )
        if data.get("runtime", "torchscript") != "torchscript" and data.get("objective", "size") != "latency":
            raise ValidationError("only used with objective 'latency' (what it times)", "runtime")


class SearchSpec(Strict):
    max_trials = fields.Integer(
        load_default=8,
        strict=True,
        validate=validate.Range(1, 50),
        metadata={"description": "Candidates tried at most (count)."},
    )
    time_budget_s = fields.Integer(
        load_default=900,
        strict=True,
        validate=validate.Range(10, 86400),
        metadata={"description": "No new candidate is started after this many seconds of searching."},
    )
    holdout = fields.Float(
        load_default=0.2,
        validate=validate.Range(0.05, 0.5),
        metadata={
            "description": "Share of the data file's rows held out: no training or calibration sees them, "
            "every candidate is judged on them (fraction)."
        },
    )
    seed = fields.Integer(
        load_default=0,
        strict=True,
        validate=validate.Range(0, 2**31 - 1),
        metadata={"description": "Seed of the hold-out split."},
    )
