"""The spec parsed once: the schemas' output as typed, frozen options, field for field."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from modelpress.options import TYPED, JobOptions, job_options, method_options, options_class, typed
from modelpress.spec import REGISTRY, SearchSpec, parse_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("schema", list(TYPED), ids=lambda schema: schema.__name__)
def test_each_options_class_has_exactly_its_schemas_fields(schema: type) -> None:
    assert [field.name for field in dataclasses.fields(TYPED[schema])] == list(schema._declared_fields)
    assert TYPED[schema].__dataclass_params__.frozen


def test_every_registered_method_has_an_options_class() -> None:
    for entry in REGISTRY.values():
        assert {f.name for f in dataclasses.fields(options_class(entry.options))} == set(entry.options._declared_fields)


def test_job_options_carry_the_schemas_defaults_and_are_immutable() -> None:
    spec = parse_spec(
        {
            "method": "pipeline",
            "input_shape": [2, 3, 8, 8],
            "steps": [
                {"method": "prune", "prune": {"amount": 0.3, "structured": True}},
                {"method": "quantize", "quantize": {"mode": "static"}},
            ],
        }
    )
    job = job_options(spec)

    assert isinstance(job, JobOptions) and job.method == "pipeline" and not job.searching
    prune, quantize = job.steps
    assert (prune.method, prune.path, prune.options.amount, prune.options.criterion) == (
        "prune",
        "spec.steps.0",
        0.3,
        "l1",
    )
    assert prune.options.modules == tuple(spec["steps"][0]["prune"]["modules"]) and prune.options.finetune is None
    assert (quantize.options.mode, quantize.options.observer, quantize.options.calibration_batches) == (
        "static",
        "histogram",
        8,
    )
    assert job.inputs is not None and job.inputs[0].shape == (2, 3, 8, 8) and job.inputs[0].dtype == "float32"
    assert job.from_input_shape and job.evaluation.runs == 20 and job.search is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        prune.options.amount = 0.9  # type: ignore[misc]


def test_a_default_changed_in_the_schema_changes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    field = SearchSpec._declared_fields["max_trials"]
    monkeypatch.setattr(field, "load_default", 3)
    job = job_options(parse_spec({"method": "auto", "target": {"metric": "cosine", "min": 0.9}}, has_data=True))
    assert job.searching and job.search is not None and job.search.max_trials == 3


def test_options_as_json_are_what_a_user_resubmits() -> None:
    step = job_options(
        parse_spec({"method": "distill", "distill": {"student": {"from": "width", "width": 0.5}}}, has_data=True)
    ).steps[0]
    resubmitted = parse_spec({"method": "distill", "distill": step.options_json()}, has_data=True)
    assert method_options("distill", resubmitted["distill"]) == step.options
    assert step.options_json()["student"] == {"from": "width", "width": 0.5}


def test_no_engine_module_reads_the_raw_spec() -> None:
    """The engine reads typed options: no ``spec.get(...)`` / ``spec[...]`` / ``options["..."]`` lookups."""
    offenders = []
    for path in sorted((ROOT / "workers" / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            target = None
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str)
            ):
                target = node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                target = node.func.value
            if isinstance(target, ast.Name) and ("spec" in target.id or target.id == "options"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_typed_turns_lists_into_tuples_and_nested_sections_into_objects() -> None:
    loaded = REGISTRY["prune"].options().load({"finetune": {"epochs": 2}, "exclude": ["head"]})
    options = typed(REGISTRY["prune"].options, loaded)
    assert options.exclude == ("head",) and options.finetune.epochs == 2 and options.finetune.seed == 0


def test_prune_training_sections_are_typed() -> None:
    spec = parse_spec(
        {
            "method": "prune",
            "input_shape": [1, 3, 8, 8],
            "prune": {
                "structured": True,
                "importance": "group_lasso",
                "regularize": {"epochs": 2},
                "finetune": {"epochs": 4},
                "schedule": {"steps": 2, "curve": "linear"},
            },
        },
        has_data=True,
    )
    options = job_options(spec).steps[0].options
    assert (options.importance, options.criterion) == ("group_lasso", "l1")
    assert (options.regularize.strength, options.regularize.epochs, options.regularize.lr) == (0.01, 2, 0.01)
    assert (options.schedule.steps, options.schedule.curve) == (2, "linear")
    assert (
        type(options.regularize).__name__ == "RegularizeOptions"
        and type(options.schedule).__name__ == "PruneScheduleOptions"
    )
    assert method_options("prune", {"criterion": "l2"}).importance == "l2"
