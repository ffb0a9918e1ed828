"""The order test files start in under `make test`: the longest first, so no process is left running a
long file alone at the end (longest-processing-time-first scheduling).

`make test` hands whole files to its processes (``--dist loadfile``) in collection order
(``--no-loadscope-reorder``; xdist's own reorder counts tests, not seconds, and put a 100 s file of
four tests last). Each file's seconds come from ``tests/durations.json``, the totals of a previous run;
a file it does not list (a new one) counts as the median file, so it neither starts first nor last.
``make test PYTEST_ARGS=--store-durations`` writes the files that run again (the others are kept), unless a
test failed.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS = Path(__file__).resolve().parent / "durations.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-durations",
        action="store_true",
        help=f"write each test file's total seconds in this run to {DURATIONS.name} (the order of the next runs)",
    )


def file_seconds() -> dict[str, float]:
    """``tests/durations.json``: test file (relative to the repository) to seconds; empty if it is missing."""
    try:
        stored = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}
    return {str(name): float(seconds) for name, seconds in stored.items()} if isinstance(stored, dict) else {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seconds = file_seconds()
    default = statistics.median(seconds.values()) if seconds else 0.0
    first_seen = {}
    for index, item in enumerate(items):
        first_seen.setdefault(item.nodeid.split("::")[0], index)
    # Longest file first; within a file, and between files of equal seconds, the collected order.
    items.sort(key=lambda item: (-seconds.get(file := item.nodeid.split("::")[0], default), first_seen[file]))


class DurationRecorder:
    """Sums each file's setup, call and teardown seconds as reports arrive (in the controller under xdist)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.totals[report.nodeid.split("::")[0]] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if session.testsfailed or not self.totals:
            return  # a failed or partial run's seconds would misorder the next runs
        totals = {**file_seconds(), **{name: round(seconds, 1) for name, seconds in self.totals.items()}}
        DURATIONS.write_text(json.dumps(dict(sorted(totals.items())), indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--store-durations") and not hasattr(config, "workerinput"):  # the controller only
        config.pluginmanager.register(DurationRecorder(), "modelpress-durations")
