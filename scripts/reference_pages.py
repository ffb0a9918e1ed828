"""The site's generated reference pages, written from the code at every build so they cannot drift.

An MkDocs hook (``hooks:`` in mkdocs.yml): ``on_files`` adds three pages that exist in no folder:

- ``reference/spec.md``: every field of the spec schema (``modelpress.spec.CompressionSpec``, with the
  options section of every registered method), its type, default, range or choices and description,
  read from the marshmallow fields themselves;
- ``reference/api.md``: every route of the service's OpenAPI document, with its parameters, body and
  responses;
- ``reference/openapi.json``: that document, as ``GET /openapi.json`` serves it.

The document comes from ``service.create_app`` with a throw-away configuration (a temporary data
directory, a Redis URL nothing listens on: the document never needs Redis). ``spec_reference`` and
``api_reference`` are plain functions, so a test can render them from any schema or document.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from marshmallow import Schema, fields, validate
from marshmallow.utils import missing

SPEC_PAGE = "reference/spec.md"
API_PAGE = "reference/api.md"
OPENAPI_FILE = "reference/openapi.json"


# ---------------------------------------------------------------------------- the MkDocs hook


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the site's files (MkDocs calls this before it builds the nav)."""
    from mkdocs.structure.files import File

    from modelpress.spec import CompressionSpec

    document = openapi_document()
    for path, content in (
        (SPEC_PAGE, spec_reference(CompressionSpec())),
        (API_PAGE, api_reference(document)),
        (OPENAPI_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n"),
    ):
        files.append(File.generated(config, path, content=content))
    return files


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document, as ``GET /openapi.json`` answers it."""
    from modelpress.config import Settings
    from service import create_app

    with tempfile.TemporaryDirectory(prefix="modelpress-docs-") as data_dir:
        settings = Settings.from_env({}).with_changes(data_dir=Path(data_dir), redis_url="redis://127.0.0.1:9/0")
        quiet = logging.getLogger("modelpress")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "the API is open to anyone": true of this throw-away app, noise in a build
        try:
            return create_app(settings).test_client().get("/openapi.json").get_json()
        finally:
            quiet.setLevel(level)


# ---------------------------------------------------------------------------- the spec reference


def spec_reference(schema: Schema, mode_defaults: Mapping[str, str] | None = None) -> str:
    """The spec reference page: one table row per field of ``schema``, nested sections flattened to
    dotted paths (``quantize.mode``, ``inputs[].dtype``), in the schema's order."""
    notes = _mode_defaults() if mode_defaults is None else mode_defaults
    rows = [_row(path, field, notes) for path, field in field_paths(schema)]
    return "\n".join(
        [
            "# Spec reference",
            "",
            "Generated from the spec schema (`modelpress/spec.py`: `CompressionSpec` and the options schema of every",
            "registered method) each time the site is built: what the API validates, this page shows.",
            "How to write a spec, with examples: [Writing a spec](../spec.md).",
            "",
            "The spec is a JSON object, sent as the `spec` form field or file part of `POST /v1/jobs`. Unknown",
            "fields are refused (`422`), and so is an options section for another method than `method`.",
            "Ranges are inclusive unless written with `<`.",
            "",
            "| field | type | default | range / values | meaning |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def field_paths(schema: Schema, prefix: str = "") -> list[tuple[str, fields.Field]]:
    """Every field of ``schema`` with the dotted path clients write (``data_key``: ``from``, not ``source``).

    A nested section contributes its own row and then its fields'; a list of sections (``inputs``,
    ``steps``) its fields under ``name[].``. Pipeline steps repeat the method sections already listed,
    so they get one row only.
    """
    paths: list[tuple[str, fields.Field]] = []
    for name, field in schema.fields.items():
        path = prefix + (field.data_key or name)
        if isinstance(field, fields.Nested):
            paths.append((path, field))
            paths += field_paths(field.schema, f"{path}.")
        elif isinstance(field, fields.List) and isinstance(field.inner, fields.Nested) and name != "steps":
            paths.append((path, field))
            paths += field_paths(field.inner.schema, f"{path}[].")
        else:
            paths.append((path, field))
    return paths


def _row(path: str, field: fields.Field, mode_defaults: Mapping[str, str]) -> str:
    cells = [
        f"`{path}`",
        _type(field),
        mode_defaults.get(path) or _default(field),
        _values(field),
        _escape(field.metadata.get("description", "")),
    ]
    return "| " + " | ".join(cells) + " |"


def _type(field: fields.Field) -> str:
    if isinstance(field, fields.List):
        return f"list of {_type(field.inner)}"
    if isinstance(field, fields.Nested):
        return "object"
    if "oneOf" in field.metadata:  # a custom field that documents its JSON forms (the output choice)
        return " or ".join(variant.get("type", "?") for variant in field.metadata["oneOf"])
    return {fields.String: "string", fields.Integer: "integer", fields.Float: "number", fields.Boolean: "boolean"}.get(
        type(field), type(field).__name__
    )


def _default(field: fields.Field) -> str:
    if field.required:
        return "required"
    default = field.load_default
    if default is missing:
        return "none"
    if callable(default):
        default = default()
    if isinstance(field, fields.Nested) and isinstance(default, Mapping):
        return "its fields' defaults"
    return f"`{json.dumps(default)}`"


def _values(field: fields.Field) -> str:
    parts = [_validator_text(check, field) for check in field.validators]
    if isinstance(field, fields.List):
        parts += [
            f"each {part}" for part in (_validator_text(check, field.inner) for check in field.inner.validators) if part
        ]
    if "oneOf" in field.metadata:
        parts += [_json_schema_text(variant) for variant in field.metadata["oneOf"]]
    if isinstance(field, fields.Boolean):
        parts.append("`true`, `false`")
    if getattr(field, "allow_none", False) and not field.required:
        parts.append("`null`")
    return "; ".join(part for part in parts if part) or "-"


def _validator_text(check: Callable[..., Any], field: fields.Field) -> str:
    if isinstance(check, validate.OneOf):
        return ", ".join(f"`{choice}`" for choice in check.choices)
    if isinstance(check, validate.Range):
        low = "" if check.min is None else f"{_number(check.min)} {'<=' if check.min_inclusive else '<'} "
        high = "" if check.max is None else f" {'<=' if check.max_inclusive else '<'} {_number(check.max)}"
        return f"{low}x{high}"
    if isinstance(check, validate.Length):
        unit = " entries" if isinstance(field, fields.List) else " characters"
        if check.min is None:
            return f"up to {check.max}{unit}"
        return f"{check.min} to {check.max}{unit}" if check.max is not None else f"at least {check.min}{unit}"
    if isinstance(check, validate.Regexp):
        return f"matches `{check.regex.pattern}`"
    return ""


def _json_schema_text(variant: Mapping[str, Any]) -> str:
    kind = variant.get("type", "")
    if kind == "integer":
        return f"an integer {variant.get('minimum', '')}..{variant.get('maximum', '')}"
    if kind == "string":
        return f"a string of {variant.get('minLength', 0)} to {variant.get('maxLength', '')} characters"
    return kind


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value >= 2**20 and (value & (value - 1)) == 0:
        return f"2^{value.bit_length() - 1}"
    if isinstance(value, int) and value >= 2**20 and ((value + 1) & value) == 0:
        return f"2^{value.bit_length()}-1"
    return str(value)


def _mode_defaults() -> dict[str, str]:
    """Defaults that depend on the quantize mode, filled by the schema after loading (its ``post_load``)
    rather than declared on the field: read from the same constants the schema uses."""
    from modelpress.method_specs import DYNAMIC_MODULES, STATIC_MODULES, STATIC_OPTIONS

    notes = {
        "quantize.modules": f"`{json.dumps(list(DYNAMIC_MODULES))}` (dynamic), "
        f"`{json.dumps(list(STATIC_MODULES))}` (static)"
    }
    for option, default in STATIC_OPTIONS.items():
        notes[f"quantize.{option}"] = f"`{json.dumps(default)}` (static only)"
    return notes


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------- the API reference


def api_reference(document: Mapping[str, Any]) -> str:
    """The API reference page: every operation of an OpenAPI 3 document, with its parameters, request
    body and responses; the schemas they name are listed after, with their properties."""
    lines = [
        "# API reference",
        "",
        "Generated from the service's OpenAPI document (`service.create_app`, as `GET /openapi.json` serves it)",
        "each time the site is built. The document itself: [openapi.json](openapi.json). A running service also",
        "serves it at `/openapi.json`, with Swagger UI at `/docs`. How to use the API: [The API](../api.md).",
        "",
        _escape(document.get("info", {}).get("description", "")),
        "",
    ]
    for route, item in document.get("paths", {}).items():
        shared = item.get("parameters", [])
        for verb, operation in item.items():
            if verb == "parameters":
                continue
            lines += _operation(document, verb, route, operation, shared)
    lines += ["## Schemas", ""]
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += _schema_section(document, name, schema)
    return "\n".join(lines) + "\n"


def _operation(
    document: Mapping[str, Any],
    verb: str,
    route: str,
    operation: Mapping[str, Any],
    shared: Iterable[Mapping[str, Any]],
) -> list[str]:
    lines = [f"## `{verb.upper()} {route}`", "", _escape(operation.get("summary", "")), ""]
    parameters = [_resolve(document, parameter) for parameter in [*shared, *operation.get("parameters", [])]]
    if parameters:
        lines += ["| parameter | in | required | type | meaning |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| `{p.get('name')}` | {p.get('in')} | {'yes' if p.get('required') else 'no'} | "
            f"{_schema_type(document, p.get('schema', {}))} | {_escape(p.get('description', ''))} |"
            for p in parameters
        ]
        lines.append("")
    body = operation.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            lines += [
                f"Request body ({'required' if body.get('required') else 'optional'}): `{media}`, "
                f"{_schema_type(document, content.get('schema', {}))}.",
                "",
            ]
    lines += ["| response | meaning | content |", "| --- | --- | --- |"]
    responses = operation.get("responses", {})
    for status in sorted(responses, key=lambda status: (status == "default", status)):  # 2xx first, default last
        response = _resolve(document, responses[status])
        content = (
            ", ".join(
                f"`{media}` {_schema_type(document, value.get('schema', {}))}"
                for media, value in response.get("content", {}).items()
            )
            or "-"
        )
        headers = ", ".join(f"`{name}`" for name in response.get("headers", {}))
        meaning = _escape(response.get("description", "")) + (f" (headers: {headers})" if headers else "")
        lines.append(f"| `{status}` | {meaning} | {content} |")
    return lines + [""]


def _schema_section(document: Mapping[str, Any], name: str, schema: Mapping[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [_escape(schema["description"]), ""]
    properties = schema.get("properties", {})
    if not properties:
        return lines + [f"Type: {_schema_type(document, schema)}.", ""]
    required = set(schema.get("required", []))
    lines += ["| property | type | required | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for prop, value in properties.items():
        default = f"`{json.dumps(value['default'])}`" if "default" in value else "-"
        lines.append(
            f"| `{prop}` | {_schema_type(document, value)} | {'yes' if prop in required else 'no'} | "
            f"{default} | {_escape(value.get('description', ''))} |"
        )
    return lines + [""]


def _schema_type(document: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})" if name in document.get("components", {}).get("schemas", {}) else name
    if "allOf" in schema or "oneOf" in schema or "anyOf" in schema:
        variants = schema.get("allOf") or schema.get("oneOf") or schema.get("anyOf")
        return " or ".join(_schema_type(document, variant) for variant in variants)
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        return f"array of {_schema_type(document, schema.get('items', {}))}"
    if "enum" in schema:
        return f"{kind}: " + ", ".join(f"`{value}`" for value in schema["enum"])
    return kind + (f" ({schema['format']})" if "format" in schema else "")


def _resolve(document: Mapping[str, Any], item: Mapping[str, Any]) -> Mapping[str, Any]:
    """A ``$ref`` to ``#/components/...`` replaced by what it names."""
    while "$ref" in item and item["$ref"].startswith("#/"):
        target: Any = document
        for part in item["$ref"][2:].split("/"):
            target = target[part]
        item = target
    return item
