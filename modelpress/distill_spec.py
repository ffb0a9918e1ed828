"""The options section of method distill: where the student comes from, the feature hints and the
schedule of narrowing students. One marshmallow schema each, read as ``modelpress.method_specs`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from modelpress.method_specs import Strict


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


# The command line's flag (``modelpress submit --distill width=0.5``): its value as options.
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
