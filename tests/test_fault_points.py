"""Every fault point in the code is one ``FAULT_POINTS`` lists, and every listed point is in the code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from modelpress.fault_injection import FAULT_POINTS, InjectedFault, UnknownFaultPoint, arm, fault_point

ROOT = Path(__file__).resolve().parent.parent


def test_the_code_marks_exactly_the_listed_points_each_once() -> None:
    marked = sorted(_marked_points())
    assert marked == sorted(FAULT_POINTS)


def test_an_unknown_point_fails_whether_or_not_the_tests_are_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELPRESS_TEST_PAUSE", raising=False)
    with pytest.raises(UnknownFaultPoint, match="before-clam"):
        fault_point("before-clam", "job", tmp_path)
    with pytest.raises(UnknownFaultPoint):
        arm(tmp_path, "mid-publsh")
    monkeypatch.setenv("MODELPRESS_TEST_PAUSE", "after-recrd:1")
    with pytest.raises(UnknownFaultPoint, match="after-recrd"):
        fault_point("after-record", "job", tmp_path)


def test_an_armed_point_strikes_once_for_the_first_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_TEST_PAUSE", "before-claim:raise")
    fault_point("before-claim", "unarmed", tmp_path)  # not armed: nothing happens
    folder = arm(tmp_path, "before-claim")
    with pytest.raises(InjectedFault, match="first"):
        fault_point("before-claim", "first", tmp_path)
    fault_point("before-claim", "second", tmp_path)  # the arm is spent
    assert sorted(path.name for path in folder.iterdir()) == ["before-claim.first"]


def _marked_points() -> list[str]:
    points = []
    for package in ("modelpress", "service", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fault_point":
                    first = node.args[0]
                    assert isinstance(first, ast.Constant), f"{path}:{node.lineno}: name the point literally"
                    points.append(first.value)
    return points
