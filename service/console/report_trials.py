"""The report page's search section (method auto): the trials table and the chart of size against
metric, with the Pareto front and the chosen candidate marked (from the report, or worked out here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.console import charts
from service.console.report_section import new_section, plain_text

_X_KEYS = ("bytes", "size_bytes", "bytes_after", "size", "size_ratio", "latency_ms", "latency", "latency_ratio", "macs")
_Y_KEYS = ("metric", "score", "value", "accuracy", "top1_agreement", "agreement", "cosine", "cosine_similarity")
_UNITS = {
    "bytes": "bytes",
    "size_bytes": "bytes",
    "bytes_after": "bytes",
    "size": "bytes",
    "latency_ms": "ms",
    "latency": "ms",
    "size_ratio": "ratio to original",
    "latency_ratio": "ratio to original",
    "macs": "MACs",
}


def trials_section(report: Mapping[str, Any]) -> dict[str, Any]:
    """The trials table and, when they hold a size and a metric, the scatter of them with the front and the chosen one."""
    trials = [t for t in report["trials"] if isinstance(t, Mapping)]
    x_key = next((k for k in _X_KEYS if any(isinstance(t.get(k), (int, float)) for t in trials)), None)
    y_key = next((k for k in _Y_KEYS if any(isinstance(t.get(k), (int, float)) for t in trials)), None)
    rows = [
        [
            plain_text(t.get("id", t.get("trial", i + 1))),
            plain_text(_trial_method(t)),
            plain_text(t.get(x_key)),
            plain_text(t.get(y_key)),
            "yes" if _on_front(report, t, i) else "",
            "yes" if _is_chosen(report, t, i) else "",
        ]
        for i, t in enumerate(trials)
    ]
    table = {
        "caption": "Trials",
        "columns": ["trial", "method", x_key or "size", y_key or "metric", "Pareto front", "chosen"],
        "rows": rows,
    }
    drawn = []
    if x_key and y_key:
        points = [
            {
                "x": float(t[x_key]),
                "y": float(t[y_key]),
                "label": f"trial {t.get('id', t.get('trial', i + 1))}"
                + (f" ({_trial_method(t)})" if _trial_method(t) else ""),
                "front": _on_front(report, t, i),
                "chosen": _is_chosen(report, t, i),
                "index": i,
            }
            for i, t in enumerate(trials)
            if isinstance(t.get(x_key), (int, float)) and isinstance(t.get(y_key), (int, float))
        ]
        if not any(p["front"] for p in points):
            _mark_front(points)
        metric = (report.get("target") or {}).get("metric") if isinstance(report.get("target"), Mapping) else None
        drawn.append(
            charts.scatter_front(
                "trials",
                "Search trials: size against metric",
                f"{x_key.replace('_', ' ')} ({_UNITS.get(x_key, 'value')})",
                metric or y_key.replace("_", " "),
                points,
            )
        )
    return new_section("trials", "Search", drawn, [table])


def _trial_method(trial: Mapping[str, Any]) -> str:
    spec = trial.get("spec")
    if isinstance(spec, Mapping):
        if spec.get("method") == "pipeline" and isinstance(spec.get("steps"), list):
            return " + ".join(str(step.get("method")) for step in spec["steps"] if isinstance(step, Mapping))
        return str(spec.get("method", ""))
    return str(trial.get("method", ""))


def _refers(reference: Any, trial: Mapping[str, Any], index: int) -> bool:
    if isinstance(reference, Mapping):
        reference = reference.get("id", reference.get("trial", reference.get("index")))
    if reference is None:
        return False
    named = [trial[k] for k in ("id", "trial") if trial.get(k) is not None]
    return reference in named if named else reference == index  # by name when trials have one, else by position


def _on_front(report: Mapping[str, Any], trial: Mapping[str, Any], index: int) -> bool:
    if any(trial.get(k) for k in ("pareto", "front", "on_front", "pareto_front")):
        return True
    front = report.get("pareto_front")
    return isinstance(front, list) and any(_refers(ref, trial, index) for ref in front)


def _is_chosen(report: Mapping[str, Any], trial: Mapping[str, Any], index: int) -> bool:
    if any(trial.get(k) is True for k in ("chosen", "selected", "best")):
        return True
    return _refers(report.get("chosen", report.get("best_trial")), trial, index)


def _mark_front(points: list[dict[str, Any]]) -> None:
    """No front in the report: mark the points no other point beats (smaller x and larger y)."""
    for point in points:
        point["front"] = not any(
            o is not point
            and o["x"] <= point["x"]
            and o["y"] >= point["y"]
            and (o["x"] < point["x"] or o["y"] > point["y"])
            for o in points
        )
