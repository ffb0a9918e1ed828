"""The README's spec reference names every field of the spec schema, so docs and schema stay one."""
from __future__ import annotations

from pathlib import Path

from marshmallow import fields

from modelpress.spec import CompressionSpec

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _field_paths(schema, prefix: str = "") -> list[str]:
    paths = []
    for name, field in schema.fields.items():
        key = field.data_key or name  # the name clients write ("from", not "source")
        if isinstance(field, fields.Nested):
            paths += _field_paths(field.schema, f"{prefix}{key}.")
        else:
            paths.append(prefix + key)
    return paths


def test_every_spec_field_has_a_row_in_the_readme() -> None:
    missing = [path for path in _field_paths(CompressionSpec()) if f"| `{path}` |" not in README]
    assert missing == []


def test_readme_shows_both_commands() -> None:
    assert "make run" in README and "make test" in README
