"""Structured pruning on the graphs people export: functional code, traces, depthwise and SE blocks,
flatten into a Linear, real branches, feature lists, transformer MLPs; the masked-reference check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import digits_splits, save_scripted, settle_batchnorm, test_accuracy, train_classifier
from workers.engine.analysis import slicing
from workers.engine.run.pipeline import compress


def _spec(shape: list[int], amount: float = 0.5, **prune: object) -> dict:
    return {
        "method": "prune",
        "seed": 0,
        "input_shape": shape,
        "evaluation": {"runs": 2, "warmup": 1},
        "prune": {
            "amount": amount,
            "structured": True,
            "criterion": "l1",
            "scope": "global",
            "modules": ["Conv2d", "Linear"],
            "exclude": None,
            "finetune": None,
            **prune,
        },
    }


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in torch.jit.load(str(path)).named_parameters()}


class FunctionalCNN(nn.Module):
    """Written with torch.nn.functional: scripting inlines F.relu's `if inplace:` checks."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 1, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.zeros(16))
        self.w2 = nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)
        self.b2 = nn.Parameter(torch.zeros(32))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w2, self.b2, padding=1)), 2)
        x = F.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1), 0.1, self.training)
        return self.head(x)


def test_functional_cnn_prunes_its_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(FunctionalCNN(), tmp_path / "functional.pt")
    report = compress(model, _spec([2, 1, 8, 8]), tmp_path / "out.pt")

    groups = {g["group"]: g for g in report["details"]["groups"]}
    assert groups["w1"]["channels_after"] == 8 and groups["w2"]["channels_after"] == 16
    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["w1"] == (8, 1, 3, 3) and shapes["b1"] == (8,) and shapes["w2"] == (16, 8, 3, 3)
    assert shapes["head.weight"] == (10, 16)
    assert torch.jit.load(str(tmp_path / "out.pt"))(torch.randn(5, 1, 8, 8)).shape == (5, 10)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_traced_cnn_prunes_aten_convolution(tmp_path: Path) -> None:
    model = settle_batchnorm(SmallCNN(), (4, 3, 12, 12), seed=0)
    traced = torch.jit.trace(model, torch.randn(1, 3, 12, 12))
    assert traced.inlined_graph.findNode("aten::_convolution") is not None  # what trace records
    traced.save(str(tmp_path / "traced.pt"))
    report = compress(tmp_path / "traced.pt", _spec([2, 3, 12, 12]), tmp_path / "out.pt")

    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["conv1.weight"] == (8, 3, 3, 3) and shapes["conv2.weight"] == (12, 8, 3, 3)
    assert shapes["bn2.weight"] == (12,) and shapes["fc.weight"] == (5, 12)
    assert report["parameters"]["after"] < 0.5 * report["parameters"]["before"]


class DepthwiseBlock(nn.Module):
    """An inverted residual: expand, depthwise (groups == channels), project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 8, 1, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.depthwise(y)))
        return self.head((x + self.project(y)).mean([2, 3]))


def test_depthwise_conv_shrinks_with_the_channels_that_feed_it(tmp_path: Path) -> None:
    model = save_scripted(settle_batchnorm(DepthwiseBlock(), (4, 8, 10, 10), seed=0), tmp_path / "dw.pt")
    report = compress(model, _spec([2, 8, 10, 10]), tmp_path / "out.pt")

    group = next(g for g in report["details"]["groups"] if g["group"] == "expand")
    assert {"expand.weight", "bn1.weight", "depthwise.weight", "bn2.weight", "project.weight"} <= set(group["tensors"])
    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["depthwise.weight"] == (16, 1, 3, 3) and shapes["project.weight"] == (8, 16, 1, 1)
    # Plain torch.jit.load, other batch sizes: the depthwise conv's groups follow its channels.
    result = torch.jit.load(str(tmp_path / "out.pt"))
    assert result(torch.randn(3, 8, 10, 10)).shape == (3, 3)
    assert report["fidelity"]["max_abs_error"] > 0  # channels really went


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.excite = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        scale = torch.sigmoid(self.excite(torch.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        x = torch.relu(self.out(x * scale))
        return self.fc(x.mean([2, 3]))


def test_squeeze_excitation_scale_is_coupled_to_the_channels_it_scales(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(SqueezeExcite(), tmp_path / "se.pt")
    report = compress(model, _spec([2, 3, 8, 8]), tmp_path / "out.pt")

    group = next(g for g in report["details"]["groups"] if g["group"] == "conv")
    assert {"conv.weight", "excite.weight", "excite.bias", "squeeze.weight", "out.weight"} <= set(group["tensors"])
    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["conv.weight"][0] == shapes["excite.weight"][0] == shapes["out.weight"][1] == 8
    assert shapes["squeeze.weight"] == (2, 8, 1, 1)


class FlattenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.flatten(torch.relu(self.conv(x)), 1))))


def test_flatten_into_linear_slices_whole_spatial_blocks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = FlattenNet().eval()
    model = save_scripted(original, tmp_path / "flat.pt")
    compress(model, _spec([2, 1, 6, 6]), tmp_path / "out.pt")

    result = torch.jit.load(str(tmp_path / "out.pt"))
    kept = [next(i for i in range(6) if torch.equal(original.conv.weight[i], row)) for row in result.conv.weight]
    assert len(kept) == 3
    # fc's columns are channel-major blocks of 4x4: the kept channels' blocks, in order.
    rows = [next(i for i in range(10) if torch.equal(original.fc.bias[i], b)) for b in result.fc.bias]
    blocks = torch.cat([original.fc.weight[:, 16 * c : 16 * (c + 1)] for c in kept], dim=1)
    assert torch.equal(result.fc.weight, blocks[rows])


class Branchy(nn.Module):
    """A real, data-dependent branch: either arm's conv makes the channels that follow."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 16, 3, padding=1)
        self.right = nn.Conv2d(8, 16, 1)
        self.tail = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if bool(x.mean() > 0.1):
            y = self.left(x)
        else:
            y = self.right(x)
        return self.fc(torch.relu(self.tail(torch.relu(y))).mean([2, 3]))


def test_real_branch_couples_both_arms(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(Branchy(), tmp_path / "branch.pt")
    report = compress(model, _spec([2, 3, 8, 8]), tmp_path / "out.pt")

    group = next(g for g in report["details"]["groups"] if "left.weight" in g["tensors"])
    assert {"right.weight", "right.bias", "tail.weight"} <= set(group["tensors"])
    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["left.weight"][0] == shapes["right.weight"][0] == shapes["tail.weight"][1] == 8
    result = torch.jit.load(str(tmp_path / "out.pt"))
    for scale in (0.0, 10.0):  # both arms run on the pruned model
        assert result(torch.randn(2, 3, 8, 8) + scale).shape == (2, 2)


class DenseNetLike(nn.Module):
    """Feature lists grown with append and joined by cat, as in torchvision's DenseNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList([nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(12, 4, 3, padding=1)])
        self.norm = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [torch.relu(self.stem(x))]
        for layer in self.layers:
            features.append(torch.relu(layer(torch.cat(features, 1))))
        return self.fc(torch.relu(self.norm(torch.cat(features, 1))).mean([2, 3]))


def test_appended_feature_lists_slice_each_segment(tmp_path: Path) -> None:
    model = save_scripted(settle_batchnorm(DenseNetLike(), (4, 3, 8, 8), seed=0), tmp_path / "dense.pt")
    report = compress(model, _spec([2, 3, 8, 8]), tmp_path / "out.pt")

    assert {g["group"] for g in report["details"]["groups"]} == {"stem", "layers.0", "layers.1"}
    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["layers.1.weight"] == (2, 6, 3, 3)  # 4 of the stem + 2 of layers.0
    assert shapes["norm.weight"] == (8,) and shapes["fc.weight"] == (3, 8)


class EncoderBlock(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def test_transformer_mlp_hidden_dimension_is_pruned_and_the_normed_stream_is_not(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(EncoderBlock(), tmp_path / "block.pt")
    report = compress(model, _spec([2, 5, 16]), tmp_path / "out.pt")

    assert [g["group"] for g in report["details"]["groups"]] == ["fc1"]
    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["fc1.weight"] == (32, 16) and shapes["fc2.weight"] == (16, 32)
    assert report["fidelity"]["max_abs_error"] > 0


def test_a_slice_that_computes_the_wrong_thing_is_put_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = save_scripted(settle_batchnorm(SmallCNN(), (4, 3, 12, 12), seed=0), tmp_path / "cnn.pt")
    real_slice = slicing._slice
    broken = []

    def slice_badly(tensor: torch.Tensor, dim: int, kept: torch.Tensor) -> torch.Tensor:
        if tensor.shape == (24, 16, 3, 3) and dim == 0:  # conv2's output rows: keep the wrong ones
            broken.append(kept)
            return real_slice(tensor, dim, torch.arange(kept.numel()).flip(0))
        return real_slice(tensor, dim, kept)

    monkeypatch.setattr(slicing, "_slice", slice_badly)
    report = compress(model, _spec([2, 3, 12, 12]), tmp_path / "out.pt")

    assert broken  # the fault struck: conv2's rows were sliced wrongly at least once
    left = {entry["group"]: entry["reason"] for entry in report["details"]["left_whole"]}
    assert "does not match the original with the same channels zeroed" in left["conv2"]
    assert [g["group"] for g in report["details"]["groups"]] == ["conv1"]  # the sound group stays pruned
    shapes = _shapes(tmp_path / "out.pt")
    assert shapes["conv2.weight"] == (24, 8, 3, 3) and shapes["fc.weight"] == (5, 24)


def test_width_distillation_of_a_functional_teacher(tmp_path: Path) -> None:
    splits = digits_splits()
    teacher = train_classifier(FunctionalCNN(), splits["x_train"], splits["y_train"], epochs=6, lr=1e-2)
    accuracy = test_accuracy(teacher.eval(), splits["x_test"], splits["y_test"])
    path = save_scripted(teacher, tmp_path / "teacher.pt")
    np.savez(tmp_path / "data.npz", inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
    spec = {
        "method": "distill",
        "seed": 0,
        "evaluation": {"runs": 2, "warmup": 1},
        "distill": {
            "student": {"source": "width", "width": 0.5},
            "temperature": 4.0,
            "alpha": None,
            "epochs": 4,
            "batch_size": 64,
            "lr": 1e-2,
            "optimizer": "adam",
            "val_fraction": 0.1,
            "early_stopping_patience": None,
            "seed": 0,
        },
    }
    report = compress(path, spec, tmp_path / "student.pt", data_path=tmp_path / "data.npz")

    student = torch.jit.load(str(tmp_path / "student.pt"))
    assert dict(student.named_parameters())["w2"].shape == (16, 8, 3, 3)
    assert report["parameters"]["after"] < 0.4 * report["parameters"]["before"]
    assert accuracy > 0.85  # a teacher worth distilling
    assert test_accuracy(student, splits["x_test"], splits["y_test"]) >= accuracy - 0.1
