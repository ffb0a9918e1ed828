"""One registry of methods: a method registered once appears in the spec, pipeline steps, the OpenAPI
document, the command line and the engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from marshmallow import fields, validate

from modelpress import spec as spec_module
from modelpress.cli import _parser, _spec_from
from modelpress.method_specs import Strict
from modelpress.spec import CliFlag, MethodEntry, SpecError, parse_spec, register_method
from tests.conftest import make_settings
from tests.models import SmallConvNet, save_scripted


class ScaleSpec(Strict):
    factor = fields.Float(
        load_default=0.5,
        validate=validate.Range(0, 10, min_inclusive=False),
        metadata={"description": "What every floating parameter is multiplied by."},
    )


def scale(model: torch.jit.ScriptModule, options: Any, data: object, progress: Any) -> tuple[Any, dict]:
    """The test method's engine entry: it receives its options as a frozen object, the defaults filled
    (a class made from its schema: ``modelpress.options.options_class``)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(options.factor)
    return model, {"factor": options.factor, "options": dataclasses.asdict(options)}


@pytest.fixture
def registered() -> Iterator[None]:
    """Register the test method; afterwards put the registry and the schemas back as they were."""
    saved = (
        dict(spec_module.REGISTRY),
        dict(spec_module.StepSpec._declared_fields),
        dict(spec_module.CompressionSpec._declared_fields),
    )
    register_method(
        MethodEntry(
            "scale",
            ScaleSpec,
            f"{__name__}:scale",
            "Spec reference",
            CliFlag("FACTOR", "scale the weights instead of --spec", lambda value, args: {"factor": float(value)}),
        )
    )
    try:
        yield
    finally:
        spec_module.REGISTRY.clear()
        spec_module.REGISTRY.update(saved[0])
        spec_module.StepSpec._declared_fields, spec_module.CompressionSpec._declared_fields = saved[1], saved[2]


def test_a_registered_method_is_in_the_spec_and_pipeline_steps(registered: None) -> None:
    spec = parse_spec({"method": "scale", "input_shape": [2, 3, 8, 8]})
    assert spec["scale"] == {"factor": 0.5}
    pipeline = parse_spec(
        {
            "method": "pipeline",
            "input_shape": [2, 3, 8, 8],
            "steps": [{"method": "scale", "scale": {"factor": 2}}, {"method": "quantize"}],
        }
    )
    assert pipeline["steps"][0]["scale"] == {"factor": 2.0}
    with pytest.raises(SpecError) as refused:
        parse_spec({"method": "pipeline", "input_shape": [2], "steps": [{"method": "scale", "scale": {"factor": -1}}]})
    assert list(refused.value.errors) == ["spec.steps.0.scale.factor"]


def test_a_method_not_registered_is_refused() -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec({"method": "scale", "input_shape": [2, 3, 8, 8]})
    assert list(refused.value.errors) == ["spec.method"]


def test_a_registered_method_is_in_the_openapi_document(registered: None, tmp_path: Path) -> None:
    from service import create_app

    # Redis is connected lazily and the document never needs it.
    app = create_app(make_settings(tmp_path, redis_url="redis://127.0.0.1:9/0"))
    document = app.test_client().get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    assert "scale" in schemas["CompressionSpec"]["properties"]["method"]["enum"]
    assert "scale" in schemas["StepSpec"]["properties"]["method"]["enum"]
    assert schemas["ScaleSpec"]["properties"]["factor"]["default"] == 0.5


def test_a_registered_method_has_a_cli_flag(registered: None) -> None:
    args = _parser().parse_args(["submit", "model.pt", "--scale", "0.25", "--input-shape", "2,3,8,8"])
    assert _spec_from(args) == {"method": "scale", "scale": {"factor": 0.25}, "input_shape": [2, 3, 8, 8]}
    with pytest.raises(ValueError, match="--scale"):
        _spec_from(_parser().parse_args(["submit", "model.pt", "--scale", "1", "--prune", "0.5"]))


def test_the_engine_runs_a_registered_method_with_its_defaults(registered: None, tmp_path: Path) -> None:
    from workers.engine.run.pipeline import compress

    torch.manual_seed(0)
    path = save_scripted(SmallConvNet(), tmp_path / "small.pt")
    spec = parse_spec({"method": "scale", "input_shape": [2, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}})
    spec["scale"] = {}  # a caller that gives no options still gets the defaults
    report = compress(path, spec, tmp_path / "out.pt")
    assert report["details"] == {"factor": 0.5, "options": {"factor": 0.5}}
    original, scaled = torch.jit.load(str(path)), torch.jit.load(str(tmp_path / "out.pt"))
    assert torch.allclose(scaled.conv.weight, original.conv.weight * 0.5)


def test_every_registered_method_names_a_readme_section() -> None:
    readme = (Path(__file__).resolve().parent.parent.parent / "README.md").read_text()
    headings = {line.lstrip("#").strip() for line in readme.splitlines() if line.startswith("#")}
    assert {entry.readme_section for entry in spec_module.REGISTRY.values()} <= headings


class _Gone:
    pass


@pytest.fixture
def dead_proxy() -> Iterator[object]:
    """A weak proxy whose object is gone, alive somewhere in the process (torch and ExecuTorch keep some):
    ``isinstance`` on it raises ReferenceError."""
    import weakref

    proxy = weakref.proxy(_Gone())
    with pytest.raises(ReferenceError):
        isinstance(proxy, int)  # the fault is there
    yield proxy


def test_registering_a_method_passes_over_dead_weak_proxies(dead_proxy: object, registered: None) -> None:
    assert "scale" in spec_module.REGISTRY
