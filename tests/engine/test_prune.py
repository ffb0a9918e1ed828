"""Pruning on real TorchScript models: sparsity, coupled channel groups, fine-tuning accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models import ConcatNet, Recurrent, ResidualNet, save_scripted, test_accuracy
from workers.engine.errors import NothingToPrune
from workers.engine.run.pipeline import compress


def _spec(shape: list[int] | None = None, **prune: object) -> dict:
    spec = {
        "method": "prune",
        "seed": 0,
        "evaluation": {"runs": 2, "warmup": 1},
        "prune": {
            "amount": 0.5,
            "structured": False,
            "criterion": "l1",
            "scope": "global",
            "modules": ["Conv2d", "Linear"],
            "exclude": None,
            "finetune": None,
            **prune,
        },
    }
    if shape:
        spec["input_shape"] = shape
    return spec


def _sparsity(path: Path, names: list[str]) -> float:
    parameters = dict(torch.jit.load(str(path)).named_parameters())
    zeros = sum(int((parameters[n] == 0).sum()) for n in names)
    return zeros / sum(parameters[n].numel() for n in names)


def test_unstructured_global_sparsity_matches_amount(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(ResidualNet(width=32), tmp_path / "res.pt")
    report = compress(model, _spec([2, 3, 16, 16], amount=0.7), tmp_path / "out.pt")

    pruned = [layer["parameter"] for layer in report["details"]["layers"]]
    assert "fc.weight" not in pruned  # the final classifier is left alone by default
    assert sorted(pruned) == ["conv1.weight", "conv2.weight", "stem.0.weight"]
    assert abs(_sparsity(tmp_path / "out.pt", pruned) - 0.7) <= 0.005
    assert report["details"]["sparsity"] == pytest.approx(0.7, abs=0.005)
    assert report["size"]["deflate_bytes_after"] < report["size"]["deflate_bytes_before"]


def test_unstructured_per_layer_prunes_each_layer_by_amount(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(ResidualNet(width=32), tmp_path / "res.pt")
    report = compress(model, _spec([2, 3, 16, 16], amount=0.4, scope="per_layer", exclude=[]), tmp_path / "out.pt")

    layers = {layer["parameter"]: layer["sparsity"] for layer in report["details"]["layers"]}
    assert set(layers) == {"stem.0.weight", "conv1.weight", "conv2.weight", "fc.weight"}
    for name in layers:
        assert abs(_sparsity(tmp_path / "out.pt", [name]) - 0.4) <= 0.005


def test_residual_addition_couples_both_sides(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(ResidualNet(width=16), tmp_path / "res.pt")
    report = compress(model, _spec([2, 3, 16, 16], structured=True), tmp_path / "out.pt")

    groups = {g["group"]: g for g in report["details"]["groups"]}
    residual = groups["stem.0"]
    # The stem's channels and conv2's outputs meet in `x + y`: one group, sliced together.
    assert {"stem.0.weight", "stem.1.weight", "conv2.weight", "bn2.weight", "conv1.weight", "fc.weight"} <= set(
        residual["tensors"]
    )
    assert residual["channels_before"] == 16 and residual["channels_after"] == 8
    result = torch.jit.load(str(tmp_path / "out.pt"))
    shapes = {name: tuple(p.shape) for name, p in result.named_parameters()}
    assert shapes["stem.0.weight"] == (8, 3, 3, 3)
    assert shapes["conv1.weight"] == (8, 8, 3, 3) and shapes["conv2.weight"] == (8, 8, 3, 3)
    assert shapes["fc.weight"] == (4, 8)
    for batch in (1, 8):
        assert result(torch.randn(batch, 3, 16, 16)).shape == (batch, 4)


def test_concatenation_slices_each_segment_of_the_consumer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = ConcatNet().eval()
    model = save_scripted(original, tmp_path / "cat.pt")
    report = compress(model, _spec([2, 3, 12, 12], structured=True, amount=0.5), tmp_path / "out.pt")

    groups = {g["group"]: g for g in report["details"]["groups"]}
    assert groups["left"]["channels_after"] == 6 and groups["right"]["channels_after"] == 10
    result = torch.jit.load(str(tmp_path / "out.pt"))
    shapes = {name: tuple(p.shape) for name, p in result.named_parameters()}
    assert shapes["mix.weight"][1] == 16  # 6 kept of the left segment + 10 of the right
    # Slices of `mix` follow the kept channels of each branch: reproduce one output by hand.
    kept_left = _kept_rows(original.left.weight, result.left.weight)
    kept_right = _kept_rows(original.right.weight, result.right.weight)
    expected_mix = torch.cat([original.mix.weight[:, kept_left], original.mix.weight[:, 12 + kept_right]], dim=1)
    # `mix` lost output channels too (its own group), so each of its rows is one of the expected rows.
    assert result.mix.weight.shape[0] == 8
    assert all(any(torch.equal(row, candidate) for candidate in expected_mix) for row in result.mix.weight)
    assert result(torch.randn(1, 3, 12, 12)).shape == (1, 4)


def _kept_rows(full: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.tensor([next(i for i in range(full.shape[0]) if torch.equal(full[i], row)) for row in kept])


def test_nothing_prunable_unstructured_succeeds_unchanged_structured_fails(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(Recurrent(features=8, hidden=16), tmp_path / "rnn.pt")
    report = compress(model, _spec([2, 5, 8], structured=False), tmp_path / "out.pt")
    assert report["details"]["notes"][0].startswith("nothing prunable")
    assert report["fidelity"]["max_abs_error"] == 0.0
    assert report["parameters"]["after"] == report["parameters"]["before"]

    # A structured job that can remove nothing is not a success: it fails, naming each group's reason.
    with pytest.raises(NothingToPrune) as failure:
        compress(model, _spec([2, 5, 8], structured=True), tmp_path / "out2.pt")
    assert failure.value.slug == "nothing-to-prune"
    assert "head: model output" in str(failure.value) and "excluded by pattern 'head'" in str(failure.value)
    assert "lstm (LSTM)" in str(failure.value) and "gru (GRU)" in str(failure.value)
    assert not (tmp_path / "out2.pt").exists()


def test_mobilenet_v3_small_prunes_depthwise_and_se_groups(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = save_scripted(torchvision.models.mobilenet_v3_small(num_classes=10), tmp_path / "mnv3.pt")
    report = compress(model, _spec([1, 3, 64, 64], structured=True), tmp_path / "out.pt")

    left = report["details"]["left_whole"]
    assert [entry["group"] for entry in left] == ["classifier.3"]  # only the excluded classifier
    assert report["parameters"]["after"] < 0.6 * report["parameters"]["before"]
    result = torch.jit.load(str(tmp_path / "out.pt"))
    for batch in (1, 8):
        assert result(torch.randn(batch, 3, 64, 64)).shape == (batch, 10)


def test_digits_unstructured_80_percent_with_finetuning_keeps_accuracy(digits: dict, tmp_path: Path) -> None:
    spec = _spec(amount=0.8, finetune={"epochs": 4, "lr": 1e-3, "batch_size": 64, "seed": 0})
    report = compress(digits["model"], spec, tmp_path / "out.pt", data_path=digits["labelled"])

    pruned = torch.jit.load(str(tmp_path / "out.pt"))
    assert test_accuracy(pruned, digits["x_test"], digits["y_test"]) >= digits["accuracy"] - 0.01
    names = [layer["parameter"] for layer in report["details"]["layers"]]
    assert abs(_sparsity(tmp_path / "out.pt", names) - 0.8) <= 0.005  # masks held through fine-tuning
    assert report["size"]["deflate_bytes_after"] <= 0.35 * digits["model"].stat().st_size
    assert [e["epoch"] for e in report["details"]["finetune"]] == [1, 2, 3, 4]
    assert report["accuracy"]["before"] > 0.95 and report["accuracy"]["after"] > 0.95


def test_digits_structured_half_with_finetuning_keeps_accuracy(digits: dict, tmp_path: Path) -> None:
    spec = _spec(amount=0.5, structured=True, finetune={"epochs": 6, "lr": 1e-3, "batch_size": 64, "seed": 0})
    report = compress(digits["model"], spec, tmp_path / "out.pt", data_path=digits["labelled"])

    pruned = torch.jit.load(str(tmp_path / "out.pt"))
    assert test_accuracy(pruned, digits["x_test"], digits["y_test"]) >= digits["accuracy"] - 0.015
    assert report["parameters"]["after"] < 0.35 * report["parameters"]["before"]
    assert report["details"]["macs"]["after"] < 0.4 * report["details"]["macs"]["before"]


def test_self_distillation_without_labels(digits: dict, tmp_path: Path) -> None:
    spec = _spec(amount=0.5, structured=True, finetune={"epochs": 4, "lr": 1e-3, "batch_size": 64, "seed": 0})
    compress(digits["model"], spec, tmp_path / "out.pt", data_path=digits["unlabelled"])

    pruned = torch.jit.load(str(tmp_path / "out.pt"))
    assert test_accuracy(pruned, digits["x_test"], digits["y_test"]) >= digits["accuracy"] - 0.03
