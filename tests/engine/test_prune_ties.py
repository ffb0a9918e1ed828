"""Structured pruning and tensors that several names hold (a language model's output layer tied to its
embedding, ALBERT-style sharing), tensors that only look alike (a transposed view), and means across
the channels that are not an RMSNorm: found by a review of `prune.hidden` (issue 26)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.spec import parse_spec
from workers.engine.errors import NothingToPrune
from workers.engine.run.pipeline import compress


def _prune(
    model: nn.Module, tmp_path: Path, inputs: list[dict], **prune: object
) -> tuple[dict, torch.jit.ScriptModule]:
    torch.jit.script(model.eval()).save(str(tmp_path / "m.pt"))
    spec = parse_spec(
        {"method": "prune", "seed": 0, "evaluation": {"runs": 1, "warmup": 0}, "inputs": inputs, "prune": prune}
    )
    report = compress(tmp_path / "m.pt", spec, tmp_path / "out.pt")
    return report, torch.jit.load(str(tmp_path / "out.pt"))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.f1, self.f2 = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.lm_head(self.norm(h + self.f2(torch.relu(self.f1(h)))))


def test_a_tied_output_layer_stays_one_parameter_object(tmp_path: Path) -> None:
    torch.manual_seed(0)
    inputs = [{"shape": [2, 5], "dtype": "int64", "low": 0, "high": 50}]
    report, pruned = _prune(TiedLM(), tmp_path, inputs, amount=0.5, structured=True, hidden=True)

    stream = [g for g in report["details"]["groups"] if "emb.weight" in g["tensors"]]
    assert [(g["channels_before"], g["channels_after"]) for g in stream] == [(16, 8)]
    names = dict(pruned.named_parameters(remove_duplicate=False))
    assert names["emb.weight"].shape == (50, 8) and names["lm_head.weight"] is names["emb.weight"]
    assert len(list(pruned.parameters())) == 7  # emb once, f1 and f2 weight and bias, norm: what fine-tuning trains


def test_a_transposed_view_is_another_tensor_and_keeps_its_values(tmp_path: Path) -> None:
    """``dec_w`` is a transposed view of ``enc.weight``: same storage, offset and shape, other strides.
    Taken for one tensor, pruning ``a`` alone overwrote ``enc.weight`` with ``dec_w``'s values."""

    class Autoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.enc = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8, bias=False)
            self.dec_w = nn.Parameter(self.enc.weight.t())
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(torch.relu(self.a(x)))
            return self.head(nn.functional.linear(torch.relu(self.enc(h)), self.dec_w))

    torch.manual_seed(0)
    model = Autoencoder()
    before = model.enc.weight.detach().clone()
    inputs = [{"shape": [2, 8], "dtype": "float32"}]
    report, pruned = _prune(model, tmp_path, inputs, amount=0.5, structured=True, exclude=["b", "enc", "dec_w", "head"])

    assert [g["group"] for g in report["details"]["groups"]] == ["a"]
    assert torch.equal(dict(pruned.named_parameters())["enc.weight"], before)


def test_names_of_one_tensor_sliced_differently_are_said_to_be_separate_now(tmp_path: Path) -> None:
    class Shared(nn.Module):  # ALBERT-style: two layers hold one weight
        def __init__(self) -> None:
            super().__init__()
            self.a, self.s1, self.s2 = nn.Linear(8, 32), nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
            self.s2.weight = self.s1.weight
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.s2(torch.relu(self.s1(torch.relu(self.a(x)))))))

    torch.manual_seed(0)
    report, _ = _prune(Shared(), tmp_path, [{"shape": [2, 8], "dtype": "float32"}], amount=0.3, structured=True)

    assert any("s1.weight and s2.weight were one tensor (tied)" in note for note in report["details"]["notes"])


def test_a_mean_square_that_is_no_rms_norm_leaves_its_channels_whole(tmp_path: Path) -> None:
    """``mean(h.pow(2), -1, keepdim=True)`` added to the output is a feature, not a norm: pruning ``h``'s
    channels would change it, so the group stays whole (it was pruned and passed its proof wrongly)."""

    class Energy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h) + h.pow(2).mean(-1, keepdim=True)

    torch.manual_seed(0)
    with pytest.raises(NothingToPrune, match="aten::mean across the channel dimension"):
        _prune(Energy(), tmp_path, [{"shape": [2, 8], "dtype": "float32"}], amount=0.5, structured=True)
