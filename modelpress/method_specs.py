"""The options sections of methods quantize and prune, and ``Strict``, the base of every section.
One marshmallow schema each; distill's are in ``modelpress.distill_spec``, a search's target and
budget in ``modelpress.search_spec``.

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

    hidden = fields.Boolean(
        load_default=False,
        metadata={
            "description": "Structured: also remove channels of a transformer's hidden (residual) width: its "
            "token and position embeddings, every residual addition, the LayerNorms on it (their statistics "
            "then cover the kept channels) and what reads it. false: that width stays whole; heads and MLP "
            "width are pruned either way."
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
        if data.get("hidden") and not data.get("structured"):
            raise ValidationError("only with structured: true (it removes channels of the hidden width)", "hidden")
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
