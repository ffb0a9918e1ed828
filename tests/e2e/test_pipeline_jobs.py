"""Pipelines and searches toward a target, through the real service (Redis, a Celery worker, the API)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from tests.conftest import ApiClient
from tests.models import ResidualNet, save_scripted, settle_batchnorm


def _model_and_data(tmp_path: Path, rows: int = 160) -> tuple[torch.nn.Module, Path, Path, torch.Tensor]:
    """A small residual CNN and a data file labelled with its own answers (so its accuracy is 1.0)."""
    torch.manual_seed(0)
    model = settle_batchnorm(ResidualNet(width=8, classes=4), (32, 3, 8, 8))
    inputs = torch.randn(rows, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    np.savez(tmp_path / "data.npz", inputs=inputs.numpy(), labels=labels.numpy())
    return model, save_scripted(model, tmp_path / "residual.pt"), tmp_path / "data.npz", inputs


def test_prune_then_static_pipeline_runs_each_step_on_the_last_ones_output(api: ApiClient, tmp_path: Path) -> None:
    original, path, data, inputs = _model_and_data(tmp_path)
    spec = {
        "method": "pipeline",
        "steps": [
            {
                "method": "prune",
                "prune": {"amount": 0.5, "structured": True, "finetune": {"epochs": 1, "batch_size": 64}},
            },
            {
                "method": "quantize",
                "quantize": {"mode": "static", "observer": "minmax", "calibration_batches": 1, "min_cosine": 0.0},
            },
        ],
        "evaluation": {"runs": 2, "warmup": 1},
    }

    submitted = api.submit(path, spec, data=data)
    assert submitted.status_code == 202, submitted.text
    job = api.wait(submitted.json()["id"], timeout=600)

    assert job["state"] == "succeeded", job["error"]
    assert job["spec"]["steps"][1]["quantize"]["reduce_range"] is True  # each step's defaults filled
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["method"] == "pipeline" and [s["method"] for s in report["steps"]] == ["prune", "quantize"]
    pruned, quantized = report["steps"]
    # The quantize step ran on the pruned model: its calibrated layers have the pruned widths.
    assert pruned["details"]["groups"] and pruned["details"]["finetune"]
    assert quantized["details"]["mode"] == "static" and quantized["details"]["quantized_modules"]
    assert quantized["bytes"] < pruned["bytes"] < report["size"]["bytes_before"]
    assert report["size"]["bytes_after"] == job["result"]["bytes"] == quantized["bytes"]
    body = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}).content
    model = torch.jit.load(io.BytesIO(body))
    graph = str(model.graph)
    assert "quantized::conv2d" in graph
    assert all(g["channels_after"] < g["channels_before"] for g in pruned["details"]["groups"])
    with torch.no_grad():  # the report measured the file served, against the original, on the data's rows
        agreement = float((model(inputs).argmax(1) == original(inputs).argmax(1)).float().mean())
    assert abs(agreement - report["fidelity"]["top1_agreement"]) < 1e-6


def test_bad_steps_and_targets_are_refused_by_field(api: ApiClient, tmp_path: Path) -> None:
    _, path, data, inputs = _model_and_data(tmp_path)
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, inputs=inputs.numpy())
    cases = [
        (
            {
                "method": "pipeline",
                "steps": [{"method": "prune"}, {"method": "quantize", "quantize": {"mode": "int4"}}],
            },
            data,
            "spec.steps.1.quantize.mode",
        ),
        ({"method": "pipeline", "steps": [{"method": "prune", "quantize": {}}]}, data, "spec.steps.0.quantize"),
        ({"method": "pipeline", "steps": [{"method": "pipeline"}]}, data, "spec.steps.0.method"),
        ({"method": "pipeline"}, data, "spec.steps"),
        (
            {
                "method": "pipeline",
                "input_shape": [2, 3, 8, 8],
                "steps": [{"method": "prune", "prune": {"finetune": {}}}],
            },
            None,
            "spec.steps.0.prune.finetune",
        ),
        ({"method": "auto"}, data, "spec.target"),
        (
            {"method": "auto", "target": {"metric": "accuracy", "max_drop": 0.01, "min": 0.9}},
            data,
            "spec.target.max_drop",
        ),
        ({"method": "auto", "target": {"metric": "accuracy", "max_drop": 0.01}}, unlabelled, "spec.target.metric"),
        ({"method": "auto", "input_shape": [2, 3, 8, 8], "target": {"metric": "cosine", "min": 0.9}}, None, "data"),
        ({"method": "quantize", "target": {"metric": "cosine", "min": 0.9}}, data, "spec.target"),
        (
            {"method": "auto", "target": {"metric": "cosine", "min": 0.9}, "search": {"max_trials": 0}},
            data,
            "spec.search.max_trials",
        ),
    ]
    for spec, data_file, field in cases:
        response = api.submit(path, spec, data=data_file)
        assert response.status_code == 422, (spec, response.text)
        assert field in response.json()["errors"], (spec, response.json()["errors"])


def test_search_returns_the_smallest_candidate_that_meets_the_target(api: ApiClient, tmp_path: Path) -> None:
    original, path, data, inputs = _model_and_data(tmp_path)
    spec = {
        "method": "auto",
        "target": {"metric": "top1_agreement", "max_drop": 0.25, "objective": "size"},
        "search": {"max_trials": 2, "holdout": 0.25},
        "evaluation": {"runs": 2, "warmup": 1},
    }

    submitted = api.submit(path, spec, data=data)
    assert submitted.status_code == 202, submitted.text
    job = api.wait(submitted.json()["id"], timeout=600)

    assert job["state"] == "succeeded", job["error"]
    report = api.session.get(api.url(job["links"]["report"])).json()
    trials = report["trials"]
    assert [t["label"] for t in trials] == ["quantize dynamic", "quantize static"]
    assert all(set(t) >= {"spec", "bytes", "latency_ms", "metric", "time_s"} for t in trials)
    meeting = [t for t in trials if t["meets_target"]]
    assert meeting and all(t["metric"] >= 0.75 for t in meeting)
    chosen = min(meeting, key=lambda t: t["bytes"])
    assert report["chosen"] == chosen["trial"] and job["result"]["bytes"] == chosen["bytes"]
    assert chosen["trial"] in report["pareto_front"]
    assert report["target"]["holdout_rows"] == 40 and report["target"]["training_rows"] == 120
    assert report["target"]["baseline"] == 1.0 and report["target"]["threshold"] == 0.75
    assert report["search"]["notes"] == ["stopped after max_trials=2 trials"]
    model = torch.jit.load(
        io.BytesIO(api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}).content)
    )
    with torch.no_grad():
        assert float((model(inputs).argmax(1) == original(inputs).argmax(1)).float().mean()) >= 0.7


def test_a_target_no_candidate_meets_fails_and_still_lists_the_trials(api: ApiClient, tmp_path: Path) -> None:
    _, path, data, _ = _model_and_data(tmp_path)
    spec = {
        "method": "auto",
        "target": {"metric": "cosine", "min": 1.0},  # int8 never reproduces float exactly
        "search": {"max_trials": 2},
        "evaluation": {"runs": 2, "warmup": 1},
    }

    submitted = api.submit(path, spec, data=data)
    assert submitted.status_code == 202, submitted.text
    job = api.wait(submitted.json()["id"], timeout=600)

    assert job["state"] == "failed" and job["error"]["type"].endswith("/target-not-met"), job["error"]
    assert "no candidate kept cosine at or above 1.0000" in job["error"]["detail"]
    assert "model" not in job["links"]
    response = api.session.get(api.url(job["links"]["report"]))
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["chosen"] is None and len(report["trials"]) == 2
    assert all(t["meets_target"] is False and t["metric"] < 1.0 for t in report["trials"])
