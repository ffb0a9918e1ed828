"""`make test` starts the longest files first (tests/scheduling.py), from tests/durations.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import scheduling


@dataclass
class Item:
    nodeid: str


def test_files_start_longest_first_and_keep_their_tests_in_order(monkeypatch, tmp_path: Path) -> None:
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps({"tests/a.py": 5.0, "tests/b.py": 90.0, "tests/c.py": 20.0}))
    monkeypatch.setattr(scheduling, "DURATIONS", durations)
    items = [Item(n) for n in ("tests/a.py::x", "tests/a.py::y", "tests/new.py::z", "tests/b.py::x", "tests/c.py::x")]
    items.append(Item("tests/b.py::y"))

    scheduling.pytest_collection_modifyitems(items)

    # b (90 s), then c (20 s) and the unlisted file counted as the median (20 s) in collected order, a last.
    assert [i.nodeid for i in items] == [
        "tests/b.py::x",
        "tests/b.py::y",
        "tests/new.py::z",
        "tests/c.py::x",
        "tests/a.py::x",
        "tests/a.py::y",
    ]


def test_every_test_file_has_its_seconds_recorded() -> None:
    """A file missing from durations.json runs at the median's place; one listed but gone is stale."""
    root = Path(__file__).resolve().parent.parent
    files = {str(path.relative_to(root)) for path in (root / "tests").rglob("test_*.py")}
    recorded = set(scheduling.file_seconds())
    assert not recorded - files, "durations.json lists files that no longer exist"
    assert len(files - recorded) <= 5, f"refresh tests/durations.json: {sorted(files - recorded)}"


@pytest.mark.parametrize("content", ["", "[1, 2]", "{not json"])
def test_without_a_durations_file_files_run_in_their_collected_order(monkeypatch, tmp_path: Path, content) -> None:
    durations = tmp_path / "durations.json"
    durations.write_text(content)
    monkeypatch.setattr(scheduling, "DURATIONS", durations)
    items = [Item("tests/z.py::a"), Item("tests/a.py::b"), Item("tests/z.py::c")]

    scheduling.pytest_collection_modifyitems(items)

    assert [i.nodeid for i in items] == ["tests/z.py::a", "tests/z.py::c", "tests/a.py::b"]
