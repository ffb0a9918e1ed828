"""Report sections the engine does not write yet (search trials, pipeline steps, unknown keys) still render.

No browser here: these check the SVG the console draws, parsed as XML, for report shapes that the
pages must already handle when other methods start writing them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from service.console.report import sections, warnings_of

SVG = "{http://www.w3.org/2000/svg}"


def _svg(section: dict, chart: str) -> ET.Element:
    found = [ET.fromstring(str(markup)) for markup in section["charts"] if f'data-chart="{chart}"' in str(markup)]
    assert len(found) == 1, [str(m)[:80] for m in section["charts"]]
    return found[0]


def test_trials_are_a_scatter_with_the_front_and_the_chosen_one_marked() -> None:
    report = {
        "method": "auto",
        "target": {"metric": "accuracy", "max_drop": 0.01, "objective": "size"},
        "trials": [
            {"id": 1, "spec": {"method": "quantize"}, "bytes": 400, "metric": 0.95},
            {"id": 2, "spec": {"method": "prune"}, "bytes": 300, "metric": 0.97},
            {
                "id": 3,
                "spec": {"method": "pipeline", "steps": [{"method": "prune"}, {"method": "quantize"}]},
                "bytes": 100,
                "metric": 0.90,
            },
            {"id": 4, "spec": {"method": "distill"}, "bytes": 350, "metric": 0.93},
        ],
        "pareto_front": [2, 3],
        "chosen": 2,
    }

    search = next(s for s in sections(report) if s["id"] == "trials")
    svg = _svg(search, "trials")
    points = {int(p.get("data-label").split()[1]): p for p in svg.iter(f"{SVG}g") if p.get("class") == "point"}
    assert sorted(points) == [1, 2, 3, 4]
    assert {i for i, p in points.items() if p.get("data-front") == "true"} == {2, 3}
    assert [i for i, p in points.items() if p.get("data-chosen") == "true"] == [2]
    assert float(points[3].get("data-x")) == 100 and float(points[3].get("data-y")) == 0.90
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert "bytes (bytes)" in texts and "accuracy" in texts and "chosen" in texts  # axis titles with units, a label
    assert svg.find(f"{SVG}title").text.startswith("Search trials")
    assert search["tables"][0]["rows"][2][1] == "prune + quantize"


def test_without_a_front_in_the_report_the_front_is_computed() -> None:
    report = {
        "trials": [
            {"size_ratio": 0.5, "top1_agreement": 0.9},
            {"size_ratio": 0.3, "top1_agreement": 0.95},
            {"size_ratio": 0.6, "top1_agreement": 0.8},
        ]
    }
    svg = _svg(next(s for s in sections(report) if s["id"] == "trials"), "trials")
    front = [p.get("data-x") for p in svg.iter(f"{SVG}g") if p.get("data-front") == "true"]
    assert front == ["0.3"]  # smaller and better than both others


def test_pipeline_steps_and_unknown_sections_are_all_shown() -> None:
    step = {
        "method": "prune",
        "size": {"bytes_before": 1000, "bytes_after": 400},
        "details": {"finetune": [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.5}]},
    }
    report = {
        "method": "pipeline",
        "size": {"bytes_before": 1000, "bytes_after": 120},
        "steps": [step],
        "calibration": {"batches": 8, "observer": "histogram"},
        "warnings": ["top-1 agreement 0.41 is under 0.5"],
    }

    drawn = sections(report)
    ids = [s["id"] for s in drawn]
    assert "step1-measurements" in ids and "step1-curve-finetune" in ids
    curve = _svg(next(s for s in drawn if s["id"] == "step1-curve-finetune"), "curve-finetune-loss")
    assert [float(p.get("data-y")) for p in curve.iter(f"{SVG}g") if p.get("class") == "point"] == [0.9, 0.5]
    more = next(s for s in drawn if s["id"] == "more")
    assert more["extra"] == {"calibration": {"batches": 8, "observer": "histogram"}}
    assert warnings_of({"warnings": ["random calibration"]}, report) == [
        "random calibration",
        "top-1 agreement 0.41 is under 0.5",
    ]


def test_a_distillation_schedule_charts_each_steps_curve_with_its_hint_loss() -> None:
    def curve(hint: list[float]) -> list[dict]:
        return [
            {"epoch": i + 1, "train_loss": 2.0 + h, "logit_loss": 2.0, "hint_loss": h, "agreement": 0.9}
            for i, h in enumerate(hint)
        ]

    report = {
        "method": "distill",
        "details": {
            "epochs": curve([0.4, 0.3]),
            "schedule": {
                "widths": [0.5, 0.25],
                "steps": [{"step": 1, "epochs": curve([0.8]), "groups": []}, {"step": 2, "epochs": curve([0.4, 0.3])}],
            },
        },
    }

    drawn = {s["id"]: s for s in sections(report)}
    assert {"curve-epochs", "curve-schedule.steps.1.epochs", "curve-schedule.steps.2.epochs"} <= set(drawn)
    assert drawn["curve-schedule.steps.1.epochs"]["title"] == "Training curve: distillation (schedule.steps.1)"
    loss = _svg(drawn["curve-epochs"], "curve-epochs-loss")
    hint = next(g for g in loss.iter(f"{SVG}g") if g.get("data-series") == "hint loss")
    assert [float(p.get("data-y")) for p in hint.iter(f"{SVG}g") if p.get("class") == "point"] == [0.4, 0.3]
