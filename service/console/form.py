"""The submit form, generated from the spec schema (``modelpress.spec.CompressionSpec``).

Each marshmallow field becomes a control named by its spec path (``spec.quantize.dtype``), the
same path a 422 names, so every error lands next to its control. Defaults, ranges, choices and
descriptions come from the fields themselves: a field added to the schema appears here without
touching the console. Shapes the form cannot express (lists of objects, dicts) get a JSON box.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema, fields, validate
from marshmallow.utils import missing
from werkzeug.datastructures import MultiDict

from modelpress.spec import CompressionSpec
from modelpress.untrusted_json import loads_bounded

PREFIX = "spec"
ADVANCED = "spec_json"  # a whole spec as JSON; when filled it is sent instead of the fields


@dataclass
class Control:
    name: str  # the spec path, also the form name and the key of its errors
    label: str
    kind: str  # select, number, checkbox, checks, text, list, shape, json, group, section
    description: str = ""
    default: Any = None
    choices: list[str] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    step: str = "any"
    pattern: str | None = None
    required: bool = False
    nullable: bool = False
    children: list[Control] = field(default_factory=list)
    method: str | None = None  # a method's own section: shown and sent only when that method is chosen

    @property
    def id(self) -> str:
        return "f-" + self.name.replace(".", "-")

    @property
    def default_text(self) -> str:
        """How the default reads in the hint and in a text box."""
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, list):
            return ", ".join(str(v) for v in self.default)
        return str(self.default)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def controls() -> list[Control]:
    """One control per field of the spec schema, nested like the spec."""
    schema = CompressionSpec()
    method = schema.fields["method"]
    methods = _choices(method) or []
    out = []
    for name, schema_field in schema.fields.items():
        control = _control(f"{PREFIX}.{schema_field.data_key or name}", schema_field)
        if name in methods and control.kind in ("group", "section"):
            control.kind, control.method, control.label = "section", name, f"{name} options"
        out.append(control)
    return out


def spec_from_form(form: MultiDict, tree: list[Control]) -> tuple[dict[str, Any] | str, dict[str, list[str]]]:
    """The spec the form describes, and errors of values that are not even of the right type.

    The advanced JSON box, when filled, is the spec as written (returned as text, parsed later
    like any API submission). Empty controls are left out so the schema's defaults apply.
    """
    advanced = (form.get(ADVANCED) or "").strip()
    if advanced:
        return advanced, {}
    errors: dict[str, list[str]] = {}
    method = form.get(f"{PREFIX}.method", "")
    spec: dict[str, Any] = {}
    for control in tree:
        key = control.name.rsplit(".", 1)[1]
        if control.method is not None and control.method != method:
            continue
        value = _value(control, form, errors, top=True)
        if value is not _OMIT:
            spec[key] = value
    return spec, errors


def errors_by_control(
    errors: Mapping[str, list[str]], tree: list[Control], others: tuple[str, ...]
) -> dict[str, list[str]]:
    """Give each error path to the nearest control that exists (``spec.a.b.c`` -> ``spec.a.b``); unknown ones stay."""
    names = {c.name for top in tree for c in top.walk()} | set(others)
    placed: dict[str, list[str]] = {}
    for path, messages in errors.items():
        target = path
        while target not in names and "." in target:
            target = target.rsplit(".", 1)[0]
        if target not in names:
            target = path
        placed.setdefault(target, []).extend(messages)
    return placed


# ---------------------------------------------------------------------------- schema -> controls

_OMIT = object()


def _control(name: str, schema_field: fields.Field) -> Control:
    description = (schema_field.metadata or {}).get("description", "")
    default = schema_field.load_default
    default = default() if callable(default) else default
    default = None if default is missing else default
    common = dict(
        name=name,
        label=name.rsplit(".", 1)[1].replace("_", " "),
        description=description,
        required=schema_field.required,
        nullable=schema_field.allow_none,
    )
    if isinstance(schema_field, fields.Nested) and not schema_field.many and isinstance(schema_field.schema, Schema):
        children = [
            _control(f"{name}.{child.data_key or child_name}", child)
            for child_name, child in schema_field.schema.fields.items()
        ]
        always = schema_field.required or default is not None
        return Control(kind="section" if always else "group", children=children, **common)
    if isinstance(schema_field, fields.Boolean):
        if default is None:  # no fixed default (the schema decides from the rest of the spec): unset, true or false
            return Control(kind="select", default=None, choices=["true", "false"], **common)
        return Control(kind="checkbox", default=bool(default), **common)
    if isinstance(schema_field, fields.String):
        choices = _choices(schema_field)
        if choices:
            return Control(kind="select", default=default, choices=choices, **common)
        regexp = next((v for v in _validators(schema_field) if isinstance(v, validate.Regexp)), None)
        return Control(kind="text", default=default, pattern=_html_pattern(regexp), **common)
    if isinstance(schema_field, fields.Number):
        control = Control(
            kind="number", default=default, step="1" if isinstance(schema_field, fields.Integer) else "any", **common
        )
        for validator in _validators(schema_field):
            if isinstance(validator, validate.Range):
                control.minimum, control.maximum = validator.min, validator.max
                control.min_exclusive = not validator.min_inclusive
                control.max_exclusive = not validator.max_inclusive
        return control
    if isinstance(schema_field, fields.List):
        inner = schema_field.inner
        choices = _choices(inner) if isinstance(inner, fields.String) else None
        if choices:
            # No default in the schema means the schema fills one from the rest of the spec (quantize
            # modules depend on the mode): left unticked, the field is then not sent at all.
            return Control(kind="checks", default=default, choices=choices, **common)
        if isinstance(inner, fields.Integer):
            return Control(kind="shape", default=default, pattern=r"\s*\d+(\s*,\s*\d+)*\s*", **common)
        if isinstance(inner, fields.String):
            return Control(kind="list", default=default, **common)
    return Control(kind="json", default=default, **common)


def _validators(schema_field: fields.Field) -> list[Callable]:
    return list(getattr(schema_field, "validators", []) or [])


def _choices(schema_field: fields.Field) -> list[str] | None:
    for validator in _validators(schema_field):
        if isinstance(validator, validate.OneOf):
            return [str(choice) for choice in validator.choices]
    return None


def _html_pattern(regexp: validate.Regexp | None) -> str | None:
    if regexp is None:
        return None
    pattern = regexp.regex.pattern
    return pattern.removeprefix("^").removesuffix("$")  # HTML anchors the pattern itself


# ---------------------------------------------------------------------------- form -> spec


def _value(control: Control, form: MultiDict, errors: dict[str, list[str]], top: bool = False) -> Any:
    if control.kind in ("section", "group"):
        if control.kind == "group" and form.get(control.name) != "on":
            return _OMIT
        out = {}
        for child in control.children:
            value = _value(child, form, errors)
            if value is not _OMIT:
                out[child.name.rsplit(".", 1)[1]] = value
        return out
    if control.kind == "checkbox":
        return form.get(control.name) == "on"
    if control.kind == "checks":
        chosen = form.getlist(control.name)
        # An untouched group sends its defaults; none ticked is a choice the schema judges, unless
        # the schema has no fixed default and fills one itself.
        return chosen if chosen or control.default is not None else _OMIT
    raw = (form.get(control.name) or "").strip()
    if raw == "":
        return _OMIT
    if control.kind == "number":
        try:
            return int(raw) if control.step == "1" else float(raw)
        except ValueError:
            errors[control.name] = ["a whole number" if control.step == "1" else "a number"]
            return _OMIT
    if control.kind == "shape":
        try:
            return [int(part) for part in raw.split(",")]
        except ValueError:
            errors[control.name] = ["whole numbers separated by commas, e.g. 8, 512"]
            return _OMIT
    if control.kind == "list":
        return [part.strip() for part in raw.split(",") if part.strip()]
    if control.kind == "json":
        try:
            return loads_bounded(raw)
        except ValueError as error:
            errors[control.name] = [f"not valid JSON: {error}"]
            return _OMIT
    return raw
