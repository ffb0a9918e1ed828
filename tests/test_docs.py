"""The site's reference pages are written from the code at build time (scripts/reference_pages.py,
an MkDocs hook), so they cannot drift: the spec reference from the marshmallow schemas, the API
reference from the service's OpenAPI document. `make test` builds the whole site with
`mkdocs build --strict` before the suite (broken links, anchors and missing pages fail it); the
last test here does the same for a plain `pytest` run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from marshmallow import fields

from modelpress import method_specs, spec as spec_module
from modelpress.spec import CompressionSpec

ROOT = Path(__file__).resolve().parent.parent


def _reference_pages():
    location = importlib.util.spec_from_file_location("reference_pages", ROOT / "scripts" / "reference_pages.py")
    module = importlib.util.module_from_spec(location)
    location.loader.exec_module(module)
    return module


reference_pages = _reference_pages()


def _field_paths(schema, prefix: str = "") -> list[str]:
    """Every field a client can write, by its dotted path (the walk the README's test used to make)."""
    paths = []
    for name, field in schema.fields.items():
        key = field.data_key or name  # the name clients write ("from", not "source")
        if isinstance(field, fields.Nested):
            paths += _field_paths(field.schema, f"{prefix}{key}.")
        else:
            paths.append(prefix + key)
    return paths


def _row(page: str, path: str) -> str:
    rows = [line for line in page.splitlines() if line.startswith(f"| `{path}` |")]
    assert len(rows) == 1, f"{path}: {len(rows)} rows"
    return rows[0]


def test_every_spec_field_has_a_row_in_the_spec_reference() -> None:
    page = reference_pages.spec_reference(CompressionSpec())
    missing = [path for path in _field_paths(CompressionSpec()) if f"| `{path}` |" not in page]
    assert missing == []
    for method in spec_module.REGISTRY:  # every registered method's section, and its choice in `method`
        assert f"| `{method}` | object |" in page and f"`{method}`" in _row(page, "method")


def test_the_spec_reference_shows_defaults_ranges_and_descriptions_from_the_schema() -> None:
    page = reference_pages.spec_reference(CompressionSpec())
    assert _row(page, "prune.amount") == (
        "| `prune.amount` | number | `0.5` | 0 < x < 1 | Fraction of weights "
        "(unstructured) or of channels per group (structured) to remove. |"
    )
    assert "`upload`, `torchvision`, `width`" in _row(page, "distill.student.from")
    assert "| required |" in _row(page, "distill.student.from")
    static_default = method_specs.STATIC_OPTIONS["calibration_batches"]
    assert f"`{static_default}` (static only)" in _row(page, "quantize.calibration_batches")


def test_changing_a_default_in_the_schema_changes_the_spec_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _row(reference_pages.spec_reference(CompressionSpec()), "evaluation.runs")
    assert "| `20` |" in before
    monkeypatch.setattr(spec_module.EvaluationSpec._declared_fields["runs"], "load_default", 37)
    after = _row(reference_pages.spec_reference(CompressionSpec()), "evaluation.runs")
    assert "| `37` |" in after and "`20`" not in after
    assert CompressionSpec().load({"method": "quantize"})["evaluation"]["runs"] == 37  # the page says what loads


def test_a_schema_with_another_default_gives_another_page() -> None:
    class WiderPrune(method_specs.PruneSpec):
        amount = fields.Float(load_default=0.25, metadata={"description": "Another default."})

    row = _row(reference_pages.spec_reference(WiderPrune()), "amount")
    assert "`0.25`" in row and "`0.5`" not in row and "Another default." in row


def test_the_api_reference_lists_every_operation_of_the_openapi_document() -> None:
    # In a process of its own: after a process has built one OpenAPI document, later ones keep the spec
    # schema of the first (seen when tests/api/test_method_registry.py ran after this test: its method
    # was missing from the document), so building one here would hide a method registered later.
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; sys.path.insert(0, 'scripts'); "
            "import reference_pages; print(json.dumps(reference_pages.openapi_document()))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    document = json.loads(made.stdout)
    page = reference_pages.api_reference(document)
    operations = [(verb, route) for route, item in document["paths"].items() for verb in item if verb != "parameters"]
    assert len(operations) >= 8
    for verb, route in operations:
        assert f"## `{verb.upper()} {route}`" in page
    assert "| `Idempotency-Key` | header |" in page and "### CompressionSpec" in page


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr[-4000:]
    spec_page = (tmp_path / "site" / "reference" / "spec" / "index.html").read_text()
    assert "evaluation.runs" in spec_page and "distill.student.from" in spec_page
    assert (tmp_path / "site" / "reference" / "openapi.json").is_file()
