"""The compression spec: one marshmallow schema, used by the API to validate and by the worker to load.

Every field has a default, a range and a unit in its metadata; the README's spec reference and
the OpenAPI document are written from the same fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from modelpress.distill_spec import DistillSpec, distill_flag
from modelpress.method_specs import PruneSpec, QuantizeSpec, Strict, prune_flag, quantize_flag
from modelpress.model_io_spec import MAX_INPUT_ELEMENTS, MAX_INPUTS, EvaluationSpec, InputSpec, OutputChoice
from modelpress.search_spec import SEARCH_RUNTIMES, SearchSpec, TargetSpec
from modelpress.targets import TARGETS, missing_runtime
from modelpress.untrusted_json import loads_bounded

# Single methods (each with an options section of its name) are those in REGISTRY, at the end of this file.
PIPELINE, AUTO = "pipeline", "auto"  # methods made of the single ones: ordered steps, or a search
MAX_STEPS = 8
PACKAGES = ("program", "aoti")
MAX_SPEC_BYTES = 64 * 1024


class StepSpec(Strict):
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


class CompressionSpec(Strict):
    method = fields.String(required=True, metadata={"description": "Compression method."})  # choices: register_method
    steps = fields.List(
        fields.Nested(StepSpec),
        validate=validate.Length(min=1, max=MAX_STEPS),
        metadata={
            "description": 'method pipeline: the steps in order, each {"method": ..., <method>: {...}}; '
            "each step's output model is the next one's input."
        },
    )
    target = fields.Nested(
        TargetSpec,
        metadata={
            "description": "methods auto (required) and pipeline: the result must keep this metric; the search returns "
            "the best candidate that does."
        },
    )
    search = fields.Nested(
        SearchSpec, metadata={"description": "How the search toward target runs (with target only)."}
    )
    input_shape = fields.List(
        fields.Integer(strict=True, validate=validate.Range(1, 1 << 20)),
        validate=validate.Length(min=1, max=8),
        metadata={
            "description": "Shape of one example input batch, batch axis first, e.g. [1, 3, 224, 224]. "
            "Needed unless a data file is uploaded."
        },
    )
    inputs = fields.List(
        fields.Nested(InputSpec),
        validate=validate.Length(min=1, max=MAX_INPUTS),
        metadata={
            "description": "One entry per positional input of forward (instead of input_shape, which "
            "means one float32 input)."
        },
    )
    output = OutputChoice(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "The output fine-tuning and distillation train on: an index into a tuple/list "
            "output or a dict output's key; null: the first tensor.",
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 1023},
                {"type": "string", "minLength": 1, "maxLength": 200},
            ],
        },
    )
    seed = fields.Integer(
        load_default=0,
        strict=True,
        validate=validate.Range(0, 2**31 - 1),
        metadata={"description": "Seed of random example inputs."},
    )
    evaluation = fields.Nested(
        EvaluationSpec,
        load_default=lambda: EvaluationSpec().load({}),
        metadata={"description": "How latency is measured."},
    )
    time_limit_s = fields.Integer(
        strict=True,
        validate=validate.Range(min=1),
        metadata={
            "description": "The job's wall-clock limit, to lower the operator's (MODELPRESS_JOB_TIMEOUT_S, "
            "also the default and the most a spec may ask for); the job fails job-timeout "
            "when it is reached (seconds)."
        },
    )
    targets = fields.List(
        fields.String(validate=validate.OneOf(list(TARGETS))),
        load_default=list,
        validate=validate.Length(max=len(TARGETS)),
        metadata={
            "description": "Extra artifacts of the same compressed model for other runtimes: 'onnx' (ONNX "
            "Runtime), 'openvino' (OpenVINO IR, .xml + .bin in a zip), 'executorch' (.pte, XNNPACK). "
            "Each is int8 when the job quantizes, timed on its runtime and checked against the "
            "original; GET /v1/jobs/<id>/artifacts lists them."
        },
    )
    targets_required = fields.Boolean(
        load_default=False,
        metadata={
            "description": "true: a target that cannot be made fails the job; false: the job succeeds with "
            "its main result, and the report and warnings say which target failed and why."
        },
    )
    package = fields.String(
        load_default="program",
        validate=validate.OneOf(PACKAGES),
        metadata={
            "description": "What a .pt2 upload's download holds: 'program' (a torch.export program; "
            "torch.export.load) or 'aoti' (the result compiled ahead of time by AOTInductor on "
            "the worker, for the worker's CPU: torch._inductor.aoti_load_package; needs a C++ "
            "compiler on the worker). TorchScript uploads: 'program' only."
        },
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
        targets = data.get("targets") or []
        if len(set(targets)) != len(targets):
            raise ValidationError("each target at most once", "targets")
        searched = SEARCH_RUNTIMES.get((data.get("target") or {}).get("runtime", "torchscript"))
        if targets and (method == AUTO or "target" in data) and targets != [searched]:
            raise ValidationError(
                "a search makes only the artifact of the runtime it times on (target.runtime); "
                "run the chosen candidate's spec (the report's trials give it) with targets",
                "targets",
            )
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
                raise ValidationError(
                    "every input's first axis is the batch axis, so they must agree: got "
                    f"{', '.join(str(entry['shape'][0]) for entry in inputs)}",
                    "inputs",
                )


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


def parse_spec(
    raw: str | bytes | Mapping[str, Any],
    has_data: bool = False,
    has_student: bool = False,
    max_time_limit_s: int | None = None,
) -> dict[str, Any]:
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
        raise SpecError(
            {
                "spec.time_limit_s": [
                    f"at most {max_time_limit_s} (this service's job time limit, MODELPRESS_JOB_TIMEOUT_S)"
                ]
            }
        )
    searched = SEARCH_RUNTIMES[spec["target"]["runtime"]] if "target" in spec else None
    if searched and not spec["targets"]:
        spec["targets"] = [searched]  # a latency search on a runtime returns the chosen candidate's artifact for it
    missing = {
        f"spec.targets.{index}": [reason]
        for index, name in enumerate(spec["targets"])
        if (reason := missing_runtime(name))
    }
    if missing:
        raise SpecError(missing)
    method = spec["method"]
    if method in REGISTRY and method not in spec:
        if REGISTRY[method].options_required:
            raise SpecError(
                {
                    f"spec.{method}": [
                        f"required when method is {method!r}"
                        + (" (at least its 'student')" if method == "distill" else "")
                    ]
                }
            )
        spec[method] = REGISTRY[method].options().load({})
    if "target" in spec:
        if not has_data:
            raise SpecError(
                {
                    "data": [
                        "required with a target: the search holds out part of the data file to judge every candidate on"
                    ]
                }
            )
        spec["search"] = spec.get("search") or SearchSpec().load({})
    uploads = []  # where an uploaded student is wanted
    for path, step in method_steps(spec):
        if step["method"] == "distill" and "distill" not in step:
            raise SpecError({f"{path}.distill": ["required when method is 'distill' (at least its 'student')"]})
        if step["method"] == "distill" and not has_data:
            raise SpecError({"data": ["required for distillation: an .npz or .safetensors file with 'inputs'"]})
        if step["method"] == "quantize" and step["quantize"]["mode"] == "qat" and not has_data:
            raise SpecError(
                {
                    f"{path}.quantize.mode": [
                        "qat trains the model: it needs a data file (multipart part "
                        "'data') with 'inputs' (and 'labels' if you have them)"
                    ]
                }
            )
        if step["method"] == "prune" and step["prune"].get("finetune") and not has_data:
            raise SpecError({f"{path}.prune.finetune": ["needs a data file (multipart part 'data') to train on"]})
        if step["method"] == "prune" and step["prune"].get("regularize") and not has_data:
            raise SpecError(
                {
                    f"{path}.prune.importance": [
                        f"{step['prune']['importance']} trains with a penalty first (prune.regularize): needs a data file "
                        "(multipart part 'data') to train on"
                    ]
                }
            )
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
            required=True,
            validate=validate.OneOf((*REGISTRY, *composite)),
            metadata={
                "description": "Compression method: a single one"
                + (", a pipeline of them (steps), or auto (a search toward target)." if composite else ".")
            },
        )
        declared[entry.name] = fields.Nested(
            entry.options, metadata={"description": f"Options of method {entry.name!r}{suffix}."}
        )
        # Method sections right after the method (the order the form and the README show).
        order = ["method", *REGISTRY, *(name for name in declared if name != "method" and name not in REGISTRY)]
        schema._declared_fields = {name: declared[name] for name in order}
    _forget_nested_instances((StepSpec, CompressionSpec))


def _forget_nested_instances(schemas: tuple[type[Schema], ...]) -> None:
    """Nested fields cache the schema instance they made (``Nested.schema``), with the fields it had
    then; schemas held since (the API blueprints' response schemas, built at import) would document
    the spec without a method registered later. Dropping those caches makes them build it again.
    Not for this module's own methods: nothing has built a schema yet, and the walk over every object
    of a process that imported torch cost each job's process half a second (issue 28)."""
    if not _BUILT:
        return
    import gc
    import weakref

    proxies = (weakref.ProxyType, weakref.CallableProxyType)  # isinstance on a dead one raises ReferenceError
    for thing in gc.get_objects():
        if type(thing) not in proxies and isinstance(thing, fields.Nested) and thing.nested in schemas:
            thing._schema = None


_BUILT = False  # True once this module's own methods are registered
for _entry in (
    MethodEntry(
        "quantize",
        QuantizeSpec,
        "workers.engine.methods.quantize.torchscript:quantize",
        "Spec reference",
        CliFlag(
            "dynamic|float16|static",
            "dynamic quantization, or static int8 (calibrated on --data) instead of --spec",
            quantize_flag,
        ),
    ),
    MethodEntry(
        "prune",
        PruneSpec,
        "workers.engine.methods.prune.torchscript:prune",
        "Spec reference",
        CliFlag("AMOUNT", "pruning amount (0..1) instead of --spec", prune_flag),
    ),
    MethodEntry(
        "distill",
        DistillSpec,
        "workers.engine.methods.distill.torchscript:distill",
        "Spec reference",
        CliFlag("width=F|torchvision=ARCH|upload", "distillation instead of --spec", distill_flag),
        options_required=True,
    ),
):
    register_method(_entry)
_BUILT = True


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
