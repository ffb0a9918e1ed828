"""The command line's inline spec: the .pt2 options reach the spec the API validates."""

from __future__ import annotations

import pytest

from modelpress.cli import _parser, _spec_from
from modelpress.spec import SpecError, parse_spec


def test_runtime_and_package_flags_fill_the_spec() -> None:
    args = _parser().parse_args(
        [
            "submit",
            "model.pt2",
            "--quantize",
            "dynamic",
            "--input-shape",
            "8,512",
            "--runtime",
            "aoti",
            "--package",
            "aoti",
        ]
    )
    spec = _spec_from(args)
    assert spec["evaluation"] == {"runtime": "aoti"} and spec["package"] == "aoti"
    parsed = parse_spec(spec, has_data=False)
    assert parsed["evaluation"]["runtime"] == "aoti" and parsed["package"] == "aoti"


def test_an_unknown_package_is_named() -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec({"method": "quantize", "input_shape": [1, 4], "package": "onnx"}, has_data=False)
    assert list(refused.value.errors) == ["spec.package"]
