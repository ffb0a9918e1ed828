"""Export targets in a job's run: each artifact of the same compressed model, made int8 by its own
tooling when the job quantizes, written beside the result, checked and timed on its own runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.spec import parse_spec
from tests.models import Eigen, ResidualNet, save_scripted, settle_batchnorm
from workers.engine.errors import TargetFailed
from workers.engine.run.pipeline import compress

QUICK = {"evaluation": {"runs": 2, "warmup": 0}}
ALL = ["onnx", "openvino", "executorch"]


@pytest.fixture(scope="module")
def residual(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("residual")
    model = settle_batchnorm(ResidualNet(), (16, 3, 16, 16), seed=0)
    rows = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    np.savez(directory / "data.npz", inputs=rows.numpy())
    program = torch.export.export(model, (rows[:8],), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    torch.export.save(program, directory / "model.pt2")
    return {
        "pt": save_scripted(model, directory / "model.pt"),
        "pt2": directory / "model.pt2",
        "data": directory / "data.npz",
    }


def _run(model: Path, data: Path, out: Path, **spec: object) -> dict:
    return compress(model, parse_spec({**QUICK, **spec}, has_data=True), out, data_path=data)


@pytest.mark.parametrize("upload", ["pt", "pt2"])
def test_static_int8_job_gives_int8_artifacts_on_every_runtime(
    residual: dict[str, Path], upload: str, tmp_path: Path
) -> None:
    out = tmp_path / f"out.{upload}"
    report = _run(residual[upload], residual["data"], out, method="quantize", quantize={"mode": "static"}, targets=ALL)

    assert out.exists() and set(report["targets"]) == set(ALL), report["targets"]
    for name, entry in report["targets"].items():
        assert entry["status"] == "succeeded", (name, entry)
        artifact = out.parent / entry["file"]
        assert artifact.is_file() and artifact.stat().st_size == entry["bytes"] > 0
        assert entry["precision"].startswith("int8"), entry
        assert entry["fidelity"]["cosine_similarity"] >= 0.98, (name, entry["fidelity"])
        assert entry["latency_ms"] > 0
    assert not [w for w in report["warnings"] if w.startswith("target")]


def test_float_job_gives_float_artifacts_that_match_the_result(residual: dict[str, Path], tmp_path: Path) -> None:
    report = _run(
        residual["pt"],
        residual["data"],
        tmp_path / "out.pt",
        method="prune",
        prune={"amount": 0.5, "structured": True},
        targets=["onnx"],
    )

    onnx = report["targets"]["onnx"]
    assert onnx["status"] == "succeeded" and onnx["precision"] == "float32"
    # The artifact computes the pruned model: its outputs agree with the original as closely as the result's.
    assert abs(onnx["fidelity"]["cosine_similarity"] - report["fidelity"]["cosine_similarity"]) < 1e-4


def test_a_target_that_cannot_express_the_model_fails_alone_unless_required(tmp_path: Path) -> None:
    model = save_scripted(Eigen(), tmp_path / "eigen.pt")
    spec = {"method": "quantize", "input_shape": [4, 6], "targets": ["onnx"]}

    report = compress(model, parse_spec({**QUICK, **spec}), tmp_path / "out.pt")

    assert (tmp_path / "out.pt").exists() and report["fidelity"]["cosine_similarity"] > 0.99  # the main result stands
    failed = report["targets"]["onnx"]
    assert failed["status"] == "failed" and "eig" in failed["reason"], failed
    assert any(w.startswith("target onnx failed") for w in report["warnings"]), report["warnings"]
    assert not (tmp_path / "model.onnx").exists()

    with pytest.raises(TargetFailed, match="onnx: could not be made"):
        compress(model, parse_spec({**QUICK, **spec, "targets_required": True}), tmp_path / "again.pt")


def test_a_latency_search_on_a_runtime_times_candidates_there_and_returns_its_artifact(
    residual: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.pt"
    spec = parse_spec(
        {
            **QUICK,
            "method": "auto",
            "search": {"max_trials": 2},
            "target": {"metric": "cosine", "min": 0.9, "objective": "latency", "runtime": "onnxruntime"},
        },
        has_data=True,
    )
    assert spec["targets"] == ["onnx"]  # filled in: the runtime's artifact comes with the result

    report = compress(residual["pt"], spec, out, data_path=residual["data"])

    timed = [trial for trial in report["trials"] if "error" not in trial]
    assert timed and all(trial["runtime"].startswith("onnxruntime ") for trial in timed), report["trials"]
    onnx = report["targets"]["onnx"]
    assert onnx["status"] == "succeeded" and (out.parent / onnx["file"]).stat().st_size == onnx["bytes"]
    chosen = next(trial for trial in report["trials"] if trial["trial"] == report["chosen"])
    assert chosen["latency_ms"] > 0 and onnx["precision"].startswith("int8")  # both candidates quantize
