"""The spec as typed, immutable options: parsed once, then handed to the parts that need them.

``parse_spec`` (``modelpress.spec``) validates a spec and fills its defaults; ``job_options`` turns
that into the frozen objects below, and the engine reads only these (no engine module digs fields
out of the raw mapping). The schemas stay the one source of every field, default and rule: the
classes here only give the schemas' output a type, field for field (a test holds each class equal
to its schema), and a method registered without a class of its own gets one made from its schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from marshmallow import Schema, fields

from modelpress.distill_spec import DistillScheduleSpec, DistillSpec, FeaturesSpec, StudentSpec
from modelpress.method_specs import (
    FinetuneSpec,
    PruneScheduleSpec,
    PruneSpec,
    QatSpec,
    QuantizeSpec,
    RegularizeSpec,
)
from modelpress.model_io_spec import EvaluationSpec, InputSpec
from modelpress.search_spec import SearchSpec, TargetSpec
from modelpress.spec import (
    AUTO,
    PIPELINE,
    REGISTRY,
    CompressionSpec,
    dump_spec,
    method_steps,
)

# ---------------------------------------------------------------------------- each method's options


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str
    dtype: str
    modules: tuple[str, ...]
    exclude: tuple[str, ...]
    per_channel: bool
    observer: str | None  # the static options are None in mode dynamic, and filled in mode static
    reduce_range: bool | None
    calibration_batches: int | None
    min_cosine: float | None
    qat: FinetuneOptions | None  # mode qat's training; None in the other modes


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int
    lr: float
    batch_size: int
    seed: int


@dataclass(frozen=True)
class RegularizeOptions:
    strength: float
    epochs: int
    lr: float


@dataclass(frozen=True)
class PruneScheduleOptions:
    steps: int
    curve: str


@dataclass(frozen=True)
class PruneOptions:
    amount: float
    structured: bool
    criterion: str  # the older name of importance l1 / l2: equal to it then
    importance: str
    scope: str
    modules: tuple[str, ...]
    exclude: tuple[str, ...] | None  # None: the final classifier
    finetune: FinetuneOptions | None
    regularize: RegularizeOptions | None  # set exactly when importance is bn_scale or group_lasso
    schedule: PruneScheduleOptions | None
    hidden: bool = False  # structured: a transformer's residual width too (embeddings, LayerNorms)


@dataclass(frozen=True)
class StudentOptions:
    source: str  # "from" in JSON
    arch: str | None
    width: float | None


@dataclass(frozen=True)
class FeaturesOptions:
    pairs: tuple[tuple[str, str], ...] | None  # (student layer, teacher layer); None: matched automatically (width)
    weight: float


@dataclass(frozen=True)
class DistillScheduleOptions:
    steps: int


@dataclass(frozen=True)
class DistillOptions:
    student: StudentOptions
    temperature: float
    alpha: float | None
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    val_fraction: float
    early_stopping_patience: int | None
    seed: int
    features: FeaturesOptions | None
    schedule: DistillScheduleOptions | None


# ---------------------------------------------------------------------------- the job's other sections


@dataclass(frozen=True)
class InputOptions:
    shape: tuple[int, ...]
    dtype: str
    low: float | None  # integers: filled ([0, 100) by default); floats: None means standard normal
    high: float | None


@dataclass(frozen=True)
class EvaluationOptions:
    runs: int
    warmup: int
    runtime: str
    max_seconds: float


@dataclass(frozen=True)
class TargetOptions:
    metric: str
    max_drop: float | None
    min: float | None
    objective: str
    runtime: str  # what a latency objective times on (search_spec.SEARCH_RUNTIMES)


@dataclass(frozen=True)
class SearchOptions:
    max_trials: int
    time_budget_s: int
    holdout: float
    seed: int


@dataclass(frozen=True)
class Step:
    """One single-method step: the method's name and its options (``QuantizeOptions``, ...)."""

    method: str
    options: Any
    path: str = "spec"  # where the step sits in the spec ("spec", or "spec.steps.<i>" in a pipeline)

    def options_json(self) -> dict[str, Any]:
        """The options as a spec would give them (JSON names, unset options left out): resubmittable."""
        return _without_none(REGISTRY[self.method].options().dump(self.options))


@dataclass(frozen=True)
class JobOptions:
    method: str  # a single method, "pipeline" or "auto"
    steps: tuple[Step, ...]  # what runs: the single method, or the pipeline's steps; empty for auto
    inputs: tuple[InputOptions, ...] | None  # the declared example inputs, or None (a data file gives them)
    from_input_shape: bool  # declared with input_shape (one float32 input): messages name that field
    output: int | str | None
    seed: int
    evaluation: EvaluationOptions
    target: TargetOptions | None
    search: SearchOptions | None
    package: str
    time_limit_s: int | None
    targets: tuple[str, ...]  # extra artifacts for other runtimes (modelpress.targets)
    targets_required: bool

    @property
    def searching(self) -> bool:
        return self.method == AUTO or self.target is not None


TYPED: dict[type[Schema], type] = {
    QuantizeSpec: QuantizeOptions,
    FinetuneSpec: FinetuneOptions,
    QatSpec: FinetuneOptions,
    RegularizeSpec: RegularizeOptions,
    PruneScheduleSpec: PruneScheduleOptions,
    PruneSpec: PruneOptions,
    StudentSpec: StudentOptions,
    FeaturesSpec: FeaturesOptions,
    DistillScheduleSpec: DistillScheduleOptions,
    DistillSpec: DistillOptions,
    InputSpec: InputOptions,
    EvaluationSpec: EvaluationOptions,
    TargetSpec: TargetOptions,
    SearchSpec: SearchOptions,
}


def job_options(spec: Mapping[str, Any]) -> JobOptions:
    """The options of a spec ``parse_spec`` accepted (or of a loaded one with some defaults left out:
    it is loaded again through the schema, so every default is the schema's)."""
    loaded = CompressionSpec().load(dump_spec(spec))
    steps = tuple(
        Step(step["method"], method_options(step["method"], step.get(step["method"])), path)
        for path, step in method_steps(loaded)
    )
    declared = loaded.get("inputs") or (
        [InputSpec().load({"shape": loaded["input_shape"]})] if loaded.get("input_shape") else None
    )
    target = loaded.get("target")
    return JobOptions(
        method=loaded["method"],
        steps=steps,
        inputs=tuple(typed(InputSpec, entry) for entry in declared) if declared else None,
        from_input_shape=not loaded.get("inputs"),
        output=loaded.get("output"),
        seed=loaded["seed"],
        evaluation=typed(EvaluationSpec, loaded["evaluation"]),
        target=typed(TargetSpec, target) if target else None,
        search=typed(SearchSpec, loaded.get("search") or SearchSpec().load({})) if target else None,
        package=loaded["package"],
        time_limit_s=loaded.get("time_limit_s"),
        targets=tuple(loaded["targets"]),
        targets_required=loaded["targets_required"],
    )


def method_options(method: str, options: Mapping[str, Any] | None = None) -> Any:
    """A method's options object from its loaded section (None or partial: the schema's defaults)."""
    schema = REGISTRY[method].options()
    return typed(type(schema), schema.load(schema.dump(options or {})))


def step(method: str, options: Mapping[str, Any] | None = None) -> Step:
    """A step as a user's pipeline step would be after validation (options as JSON, e.g. ``{"mode": "static"}``)."""
    schema = REGISTRY[method].options()
    return Step(method, typed(type(schema), schema.load(dict(options or {}))))


def typed(schema: type[Schema], loaded: Mapping[str, Any]) -> Any:
    """The frozen object of ``schema``'s class for one loaded section; lists become tuples."""
    declared = schema._declared_fields
    return options_class(schema)(**{name: _typed_value(declared[name], loaded.get(name)) for name in declared})


@cache
def options_class(schema: type[Schema]) -> type:
    """The options class of a schema: the one above, or one made from the schema's fields."""
    if schema in TYPED:
        return TYPED[schema]
    name = schema.__name__.removesuffix("Spec") + "Options"
    return dataclasses.make_dataclass(name, [(field, Any) for field in schema._declared_fields], frozen=True)


def _typed_value(field: fields.Field, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(field, fields.Nested):
        nested = field.nested() if callable(field.nested) and not isinstance(field.nested, type) else field.nested
        return typed(nested if isinstance(nested, type) else type(nested), value)
    if isinstance(field, fields.List):
        return tuple(_typed_value(field.inner, item) for item in value)
    return value


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    return value


__all__ = ["AUTO", "PIPELINE", "JobOptions", "Step", "job_options", "method_options", "step", "typed"]
