"""The spec's sections about running the model: its example inputs (``InputSpec``, with their
limits and defaults), the output that training and comparison read (``OutputChoice``) and how
its latency is timed (``EvaluationSpec``). ``modelpress.spec`` nests them in the whole spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from modelpress.method_specs import Strict

MAX_INPUT_ELEMENTS = 1 << 26  # 64M floats (256 MB): bigger example inputs are a mistake or an attack
INPUT_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32")
# Random integer inputs (token ids, indices) are drawn from [low, high); a vocabulary of at least
# 100 is the common case, and a model that needs another range says so when it fails.
DEFAULT_INT_RANGE = (0, 100)
MAX_INPUTS = 16
MAX_INT_BOUND = 2**53  # int64 bounds exactly representable in JSON numbers and float64


class InputSpec(Strict):
    shape = fields.List(
        fields.Integer(strict=True, validate=validate.Range(1, 1 << 20)),
        required=True,
        validate=validate.Length(min=1, max=8),
        metadata={"description": "Shape of this input's example batch, batch axis first."},
    )
    dtype = fields.String(
        load_default="float32",
        validate=validate.OneOf(INPUT_DTYPES),
        metadata={"description": "Element type of this input."},
    )
    low = fields.Float(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "Random values from [low, high): floats uniform (default: standard "
            "normal), integers default [0, 100); not for bool."
        },
    )
    high = fields.Float(
        load_default=None,
        allow_none=True,
        metadata={"description": "Upper bound (exclusive) of random values; see low."},
    )

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


class EvaluationSpec(Strict):
    runs = fields.Integer(
        load_default=20,
        strict=True,
        validate=validate.Range(1, 1000),
        metadata={"description": "Timed forward passes per model; the report gives the median (count)."},
    )
    warmup = fields.Integer(
        load_default=3,
        strict=True,
        validate=validate.Range(0, 100),
        metadata={"description": "Untimed passes before timing (count)."},
    )
    runtime = fields.String(
        load_default="eager",
        validate=validate.OneOf(("eager", "compile", "aoti")),
        metadata={
            "description": "How a torch.export (.pt2) program is run when timed: 'eager' "
            "(ExportedProgram.module()), 'compile' (torch.compile of it) or 'aoti' (an "
            "AOTInductor package; needs a C++ compiler on the worker). TorchScript models: "
            "'eager' only."
        },
    )
    max_seconds = fields.Float(
        load_default=30.0,
        validate=validate.Range(min=0.1, max=3600),
        metadata={
            "description": "Time budget of the latency measurement of each model (seconds): warmup and timed "
            "passes stop once it is spent, after at least one timed pass; the report says how "
            "many ran."
        },
    )
