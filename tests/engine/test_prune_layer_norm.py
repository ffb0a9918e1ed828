"""Structured pruning of LayerNorm-normalised residual streams (ConvNeXt style), scripted and traced.

A layer_norm over the channels couples its weight and bias to them, and its statistics change
when channels go: the check after slicing compares with a reference whose statistics cover the
kept channels only, so a slice that computes the wrong thing is still caught and put back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.analysis import slicing
from workers.engine.run.pipeline import compress


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt norm: channels moved last, normalised, moved back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class Block(nn.Module):
    """dwconv 7x7, channels last, LayerNorm, Linear-GELU-Linear, channels first, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class TinyConvNeXt(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, stride=2), LayerNorm2d(16, eps=1e-6))
        self.stage1 = Block(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, stride=2))
        self.stage2 = Block(32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def _model(tmp_path: Path, export: str) -> Path:
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    with torch.no_grad():  # norms that are not the identity, so a misplaced weight shows
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    path = tmp_path / f"convnext-{export}.pt"
    with torch.no_grad():
        exported = torch.jit.script(model) if export == "script" else torch.jit.trace(model, torch.randn(1, 3, 16, 16))
    exported.save(str(path))
    return path


def _spec(amount: float = 0.5) -> dict:
    return {
        "method": "prune",
        "seed": 0,
        "input_shape": [2, 3, 16, 16],
        "evaluation": {"runs": 2, "warmup": 1},
        "prune": {
            "amount": amount,
            "structured": True,
            "criterion": "l1",
            "scope": "global",
            "modules": ["Conv2d", "Linear"],
            "exclude": None,
            "finetune": None,
        },
    }


@pytest.mark.parametrize("export", ["script", "trace"])
def test_layer_norm_residual_stream_shrinks(tmp_path: Path, export: str) -> None:
    report = compress(_model(tmp_path, export), _spec(), tmp_path / "out.pt")

    pruned = torch.jit.load(str(tmp_path / "out.pt"))
    shapes = {name: tuple(p.shape) for name, p in pruned.named_parameters()}
    # Stage 1's stream: stem conv, its LayerNorm2d, the block's dwconv, LayerNorm, MLP, layer scale, downsample.
    assert shapes["stem.0.weight"] == (8, 3, 2, 2) and shapes["stem.1.weight"] == (8,)
    assert shapes["stage1.block.0.weight"] == (8, 1, 7, 7) and shapes["stage1.block.2.weight"] == (8,)
    assert shapes["stage1.block.3.weight"] == (32, 8) and shapes["stage1.block.5.weight"] == (8, 32)
    assert shapes["stage1.layer_scale"] == (8, 1, 1)
    assert shapes["down.0.weight"] == (8,) and shapes["down.1.weight"] == (16, 8, 2, 2)
    # Stage 2's stream ends in the head's LayerNorm; the classifier keeps its 5 outputs.
    assert shapes["stage2.block.2.weight"] == (16,) and shapes["norm.weight"] == (16,)
    assert shapes["head.weight"] == (5, 16)
    assert pruned(torch.randn(3, 3, 16, 16)).shape == (3, 5)
    assert pruned(torch.randn(1, 3, 20, 20)).shape == (1, 5)  # no size compiled in: other images work too

    renormalised = {g["group"]: g.get("layer_norms_renormalised") for g in report["details"]["groups"]}
    assert sorted(n for n in renormalised.values() if n) == [2, 3]  # stem + block + down; block + head
    assert any("layer_norm" in note for note in report["details"]["notes"])
    assert report["parameters"]["after"] < 0.35 * report["parameters"]["before"]


def test_a_wrong_slice_in_a_layer_norm_group_is_put_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _model(tmp_path, "script")
    marker = dict(torch.jit.load(str(path)).named_parameters())["stage1.block.2.weight"].detach()
    real_slice = slicing._slice
    broken = []

    def slice_badly(tensor: torch.Tensor, dim: int, kept: torch.Tensor) -> torch.Tensor:
        if tensor.shape == marker.shape and torch.equal(tensor, marker):  # stage 1's LayerNorm weight: wrong entries
            broken.append(kept)
            return real_slice(tensor, dim, torch.arange(kept.numel()).flip(0))
        return real_slice(tensor, dim, kept)

    monkeypatch.setattr(slicing, "_slice", slice_badly)
    report = compress(path, _spec(), tmp_path / "out.pt")

    assert broken  # the fault struck: the LayerNorm's weight was sliced wrongly at least once
    left = {entry["group"]: entry["reason"] for entry in report["details"]["left_whole"]}
    stream = [name for name, reason in left.items() if "does not match the original" in reason]
    assert len(stream) == 1 and left[stream[0]].startswith("put back")
    shapes = {name: tuple(p.shape) for name, p in torch.jit.load(str(tmp_path / "out.pt")).named_parameters()}
    assert shapes["stage1.block.2.weight"] == (16,) and shapes["stem.0.weight"] == (16, 3, 2, 2)  # put back whole
    assert shapes["stage2.block.2.weight"] == (16,) and shapes["stage1.block.3.weight"] == (32, 16)  # others pruned
