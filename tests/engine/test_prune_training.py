"""Pruning that trains: importance from a sparsity-training phase (bn_scale, group_lasso) and
iterative schedules, on the digits CNN (real data; a few epochs each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.spec import parse_spec
from tests.exported_archives import save_exported
from tests.models import ConcatNet, DigitsCNN, save_scripted, settle_batchnorm
from workers.engine.analysis.channels import channel_groups
from workers.engine.analysis.slicing import tensors
from workers.engine.errors import UnsupportedModel
from workers.engine.formats.torchscript import clone_model
from workers.engine.inputs import Dataset
from workers.engine.methods.prune import torchscript
from workers.engine.methods.prune.importance import group_norms, trainable_names
from workers.engine.methods.prune.schedule import step_amounts
from workers.engine.methods.training import finetune
from workers.engine.run.pipeline import compress

SCALES = ("features.1.weight", "features.4.weight", "features.8.weight")  # DigitsCNN's BatchNorm scales
PHASE = {"epochs": 3, "lr": 1e-2, "strength": 3e-2}


def _spec(**prune: object) -> dict:
    return parse_spec({"method": "prune", "evaluation": {"runs": 2, "warmup": 1}, "prune": prune}, has_data=True)


def _after_phase(monkeypatch: pytest.MonkeyPatch) -> list[torch.jit.ScriptModule]:
    """A copy of the model as the sparsity-training phase leaves it, before any channel is ranked."""
    copies: list[torch.jit.ScriptModule] = []
    phase = torchscript.regularize

    def spy(model: torch.jit.ScriptModule, *args: object, **kwargs: object) -> dict:
        report = phase(model, *args, **kwargs)
        copies.append(clone_model(model))
        return report

    monkeypatch.setattr(torchscript, "regularize", spy)
    return copies


def _control(digits: dict) -> torch.jit.ScriptModule:
    """The same phase (epochs, lr, batches) without the penalty."""
    model, teacher = torch.jit.load(str(digits["model"])), torch.jit.load(str(digits["model"]))
    finetune(
        model,
        Dataset(digits["x_train"], digits["y_train"]),
        teacher,
        epochs=PHASE["epochs"],
        lr=PHASE["lr"],
        batch_size=32,
    )
    return model


def test_bn_scale_drives_scales_to_zero_and_removes_the_smallest(
    digits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after_phase = _after_phase(monkeypatch)
    report = compress(
        digits["model"],
        _spec(amount=0.5, structured=True, importance="bn_scale", regularize=PHASE),
        tmp_path / "out.pt",
        data_path=digits["labelled"],
    )

    phase = report["details"]["regularize"]
    assert phase["importance"] == "bn_scale" and [e["epoch"] for e in phase["curve"]] == [1, 2, 3]
    assert phase["penalised"]["batch_norm_scales"] == list(SCALES)
    small = [phase["before"]["scales_below_0.01"]] + [e["scales_below_0.01"] for e in phase["curve"]]
    assert small[0] == 0.0 and small[-1] >= 0.05 and small[-1] == max(small)
    assert phase["curve"][-1]["scale_mean"] < 0.5 * phase["before"]["scale_mean"]
    assert all(e["penalty"] > 0 for e in phase["curve"])
    control = dict(_control(digits).named_parameters())
    control_scales = torch.cat([control[name].detach().abs() for name in SCALES])
    assert float((control_scales < 0.01).float().mean()) == 0.0  # without the penalty no scale gets near zero
    assert float(control_scales.mean()) > 2 * phase["curve"][-1]["scale_mean"]

    # No fine-tuning after the phase: the kept scales are the phase's, and they are its largest.
    trained = dict(after_phase[0].named_parameters())
    pruned = dict(torch.jit.load(str(tmp_path / "out.pt")).named_parameters())
    for name in SCALES:
        kept = pruned[name].detach()
        largest = trained[name].detach().abs().topk(kept.numel()).indices.sort().values
        assert torch.equal(kept, trained[name].detach()[largest]), name
    assert report["details"]["importance"] == "bn_scale"


def _mean_group_norm(model: torch.jit.ScriptModule, example: torch.Tensor) -> float:
    groups = [
        g
        for g in channel_groups(model, {n: t.shape for n, t in tensors(model).items()}, (example,))
        if not g.blocked and g.name != "classifier"
    ]
    live, trainable = tensors(model), trainable_names(model)
    with torch.no_grad():
        return float(torch.cat([group_norms(g, live, trainable) for g in groups]).mean())


def test_group_lasso_shrinks_group_norms_and_removes_the_smallest(
    digits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after_phase = _after_phase(monkeypatch)
    report = compress(
        digits["model"],
        _spec(amount=0.5, structured=True, importance="group_lasso", regularize={**PHASE, "strength": 1e-2}),
        tmp_path / "out.pt",
        data_path=digits["labelled"],
    )

    phase = report["details"]["regularize"]
    norms = [phase["before"]["group_norm_mean"]] + [e["group_norm_mean"] for e in phase["curve"]]
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.5 * norms[0]
    assert phase["penalised"]["groups"] == ["features.0", "features.3", "features.7"]
    example = digits["x_train"][:2]
    assert _mean_group_norm(torch.jit.load(str(digits["model"])), example) == pytest.approx(norms[0], rel=1e-4)
    assert _mean_group_norm(_control(digits), example) > 1.5 * norms[-1]  # without the penalty they stay

    # The first conv's rows (its group's producer) kept are those of the largest group norms.
    trained = after_phase[0]
    group = next(
        g
        for g in channel_groups(trained, {n: t.shape for n, t in tensors(trained).items()}, (example,))
        if g.name == "features.0"
    )
    with torch.no_grad():
        scores = group_norms(group, tensors(trained), trainable_names(trained))
    kept = dict(torch.jit.load(str(tmp_path / "out.pt")).named_parameters())["features.0.weight"].detach()
    largest = scores.topk(kept.shape[0]).indices.sort().values
    assert torch.equal(kept, dict(trained.named_parameters())["features.0.weight"].detach()[largest])


def test_unstructured_three_step_cubic_schedule_reaches_the_one_shot_sparsity(digits: dict, tmp_path: Path) -> None:
    finetuning = {"epochs": 4, "lr": 1e-3, "batch_size": 64, "seed": 0}
    stepped = compress(
        digits["model"],
        _spec(amount=0.8, finetune=finetuning, schedule={"steps": 3}),
        tmp_path / "stepped.pt",
        data_path=digits["labelled"],
    )
    one_shot = compress(
        digits["model"], _spec(amount=0.8, finetune=finetuning), tmp_path / "one.pt", data_path=digits["labelled"]
    )

    schedule = stepped["details"]["schedule"]
    expected = [0.8 * (1 - (2 / 3) ** 3), 0.8 * (1 - (1 / 3) ** 3), 0.8]
    assert schedule["curve"] == "cubic" and [s["amount"] for s in schedule["steps"]] == pytest.approx(
        expected, abs=1e-6
    )
    assert [s["sparsity"] for s in schedule["steps"]] == pytest.approx(expected, abs=1e-4)
    assert [s["epochs"] for s in schedule["steps"]] == [1, 1, 2] and schedule["epochs"] == 4
    assert [len(s["finetune"]) for s in schedule["steps"]] == [1, 1, 2]
    assert [(e["epoch"], e["step"]) for e in stepped["details"]["finetune"]] == [(1, 1), (2, 2), (3, 3), (4, 3)]
    assert stepped["details"]["sparsity"] == one_shot["details"]["sparsity"]
    pruned = dict(torch.jit.load(str(tmp_path / "stepped.pt")).named_parameters())
    names = [layer["parameter"] for layer in stepped["details"]["layers"]]
    zeros = sum(int((pruned[n] == 0).sum()) for n in names)
    assert zeros == round(0.8 * sum(pruned[n].numel() for n in names))  # the masks held through every step
    assert stepped["accuracy"]["after"] > 0.95


def test_structured_linear_schedule_ends_with_the_one_shot_channels(digits: dict, tmp_path: Path) -> None:
    finetuning = {"epochs": 3, "lr": 1e-3, "batch_size": 64, "seed": 0}
    stepped = compress(
        digits["model"],
        _spec(amount=0.7, structured=True, finetune=finetuning, schedule={"steps": 3, "curve": "linear"}),
        tmp_path / "stepped.pt",
        data_path=digits["labelled"],
    )
    one_shot = compress(
        digits["model"],
        _spec(amount=0.7, structured=True, finetune=finetuning),
        tmp_path / "one.pt",
        data_path=digits["labelled"],
    )

    steps = stepped["details"]["schedule"]["steps"]
    assert [s["amount"] for s in steps] == pytest.approx([0.7 / 3, 1.4 / 3, 0.7], abs=1e-6)
    channels = [s["channels_after"] for s in steps]
    assert channels == sorted(channels, reverse=True) and len(set(channels)) == 3
    assert [s["epochs"] for s in steps] == [1, 1, 1] and all(len(s["finetune"]) == 1 for s in steps)
    assert stepped["parameters"]["after"] == one_shot["parameters"]["after"] < 0.2 * one_shot["parameters"]["before"]
    assert stepped["details"]["channels"] == one_shot["details"]["channels"]
    merged = {g["group"]: (g["channels_before"], g["channels_after"]) for g in stepped["details"]["groups"]}
    assert merged == {g["group"]: (g["channels_before"], g["channels_after"]) for g in one_shot["details"]["groups"]}
    assert step_amounts(0.7, 3, "linear")[-1] == 0.7


class ConvThenMlp(nn.Module):
    """A conv with a BatchNorm, then a hidden Linear layer without one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.hidden(x)))


def _random_data(path: Path, rows: int = 32) -> Path:
    np.savez(path, inputs=np.random.default_rng(0).standard_normal((rows, 3, 8, 8)).astype(np.float32))
    return path


def test_bn_scale_without_any_batchnorm_fails_and_partly_falls_back_to_l1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = _random_data(tmp_path / "data.npz")
    spec = _spec(amount=0.5, structured=True, importance="bn_scale", regularize={"epochs": 1})
    with pytest.raises(UnsupportedModel, match="no prunable channel group has one"):
        compress(save_scripted(ConcatNet(), tmp_path / "concat.pt"), spec, tmp_path / "out.pt", data_path=data)

    model = settle_batchnorm(ConvThenMlp(), (8, 3, 8, 8), seed=0)
    report = compress(save_scripted(model, tmp_path / "mixed.pt"), spec, tmp_path / "out.pt", data_path=data)
    assert report["details"]["regularize"]["penalised"]["batch_norm_scales"] == ["bn.weight"]
    assert any("hidden" in w and "l1 norm" in w for w in report["warnings"])
    assert {g["group"]: g["channels_after"] for g in report["details"]["groups"]} == {"conv": 4, "hidden": 8}


def test_programs_take_schedules_for_channels_and_refuse_the_rest(digits: dict, tmp_path: Path) -> None:
    network = DigitsCNN()
    network.load_state_dict(torch.jit.load(str(digits["model"])).state_dict())
    program = save_exported(network.eval(), digits["x_train"][:4], tmp_path / "digits.pt2")
    finetuning = {"epochs": 2, "batch_size": 64}
    for prune, reason in (
        ({"structured": True, "importance": "bn_scale"}, "not available for .pt2 programs"),
        ({"schedule": {"steps": 2}, "finetune": finetuning}, "after unstructured pruning"),
    ):
        with pytest.raises(UnsupportedModel, match=reason):
            compress(program, _spec(**prune), tmp_path / "out.pt2", data_path=digits["labelled"])

    report = compress(
        program,
        _spec(amount=0.5, structured=True, schedule={"steps": 2}, finetune=finetuning),
        tmp_path / "out.pt2",
        data_path=digits["labelled"],
    )
    assert [(s["step"], s["epochs"]) for s in report["details"]["schedule"]["steps"]] == [(1, 1), (2, 1)]
    pruned = torch.export.load(tmp_path / "out.pt2").state_dict
    assert [pruned[f"features.{i}.weight"].shape[0] for i in (0, 3, 7)] == [16, 32, 64]
