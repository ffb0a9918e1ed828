"""The sections of method auto: a search's target (the metric to keep, the objective to minimise)
and its budget. One marshmallow schema each, read as ``modelpress.method_specs`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from modelpress.method_specs import Strict

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


def target_conflicts(spec: Mapping[str, Any], has_labels: bool) -> dict[str, list[str]]:
    """A target the data file cannot judge: accuracy without labels."""
    if (spec.get("target") or {}).get("metric") == "accuracy" and not has_labels:
        return {
            "spec.target.metric": [
                "accuracy needs a 'labels' array in the data file; use top1_agreement or "
                "cosine to compare with the original's outputs instead"
            ]
        }
    return {}
