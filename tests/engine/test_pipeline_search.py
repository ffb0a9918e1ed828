"""Pipelines and the search in the engine: progress names the step and the trial; a search stops early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.spec import parse_spec
from tests.models import ResidualNet, save_scripted, settle_batchnorm
from workers.engine.errors import TargetNotMet
from workers.engine.run.pipeline import compress


@pytest.fixture
def residual(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = settle_batchnorm(ResidualNet(width=8, classes=4), (32, 3, 8, 8))
    inputs = torch.randn(120, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "data.npz", inputs=inputs.numpy())
    return save_scripted(model, tmp_path / "residual.pt"), tmp_path / "data.npz"


def test_progress_names_each_step_and_each_report_section_follows_the_last(residual, tmp_path: Path) -> None:
    path, data = residual
    spec = parse_spec(
        {
            "method": "pipeline",
            "evaluation": {"runs": 1, "warmup": 0},
            "steps": [
                {"method": "prune", "prune": {"amount": 0.5}},
                {"method": "quantize", "quantize": {"mode": "dynamic"}},
            ],
        },
        has_data=True,
    )
    stages: list[tuple[str, float]] = []

    report = compress(path, spec, tmp_path / "out.pt", data_path=data, progress=lambda s, f: stages.append((s, f)))

    assert any(s.startswith("step 1/2 prune: ") for s, _ in stages)
    assert any(s.startswith("step 2/2 quantize: ") for s, _ in stages)
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    pruned, quantized = report["steps"]
    assert pruned["details"]["sparsity"] == pytest.approx(0.5, abs=0.01) and pruned["prune"]["amount"] == 0.5
    # Dynamic int8 quantized the pruned fc: zeros pruned in step 1 are still zeros after step 2.
    assert quantized["details"]["quantized_modules"] and quantized["bytes"] == report["size"]["bytes_after"]
    assert report["details"] == {"steps": ["prune", "quantize"]}


def test_a_pipeline_with_a_target_stops_where_the_target_is_already_missed(residual, tmp_path: Path) -> None:
    path, data = residual
    # Removing channels never leaves the outputs exactly as they were, so the first rung misses.
    spec = parse_spec(
        {
            "method": "pipeline",
            "evaluation": {"runs": 1, "warmup": 0},
            "target": {"metric": "cosine", "min": 1.0},
            "steps": [
                {"method": "prune", "prune": {"amount": 0.3, "structured": True}},
                {"method": "quantize", "quantize": {"mode": "static", "observer": "minmax"}},
            ],
        },
        has_data=True,
    )
    stages: list[str] = []

    with pytest.raises(TargetNotMet) as missed:
        compress(path, spec, tmp_path / "out.pt", data_path=data, progress=lambda s, f: stages.append(s))

    trials = missed.value.report["trials"]
    assert len(trials) == 1 and trials[0]["label"] == "prune structured 0.3 + quantize static"
    assert trials[0]["metric"] < 1.0 and "later steps were not run" in trials[0]["stopped_early"]
    assert not any("step 2/2" in s for s in stages)  # quantize never ran
    assert any(s.startswith("trial 1/8 (prune structured 0.3 + quantize static): step 1/2 prune") for s in stages)
    assert missed.value.report["target"]["holdout_rows"] == 24 and missed.value.report["chosen"] is None
    assert not (tmp_path / "out.pt").exists()
