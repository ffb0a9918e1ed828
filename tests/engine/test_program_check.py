"""The in-job check alone: every method graph of a loaded model, with calls inlined, before it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.operator_policy import scan_source
from tests.models import SmallConvNet, save_scripted
from workers.engine.errors import UnsafeModel
from workers.engine.formats.program_check import check_module
from workers.engine.formats.torchscript import load_model


@torch.jit.script
def _sneaky(path: str) -> torch.Tensor:
    return torch.from_file(path, False, 4, dtype=torch.uint8)


class Inner(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e30:  # a branch never taken on real inputs still holds the call
            return x + _sneaky("/etc/hostname").float().sum()
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2


def test_a_file_read_in_a_function_of_a_submodule_behind_a_branch_is_found(tmp_path: Path) -> None:
    model = load_model(save_scripted(Outer(), tmp_path / "m.pt"))

    with pytest.raises(UnsafeModel, match="aten::from_file"):
        check_module(model)


def test_an_ordinary_model_passes(tmp_path: Path) -> None:
    check_module(load_model(save_scripted(SmallConvNet(), tmp_path / "ok.pt")))


@pytest.mark.parametrize(
    "source, op",
    [
        ("y = torch.from_file('a', False, 4)", "aten::from_file"),
        ("y = torch .\n  from_file('a')", "aten::from_file"),
        ("y = ops.aten.from_file('a')", "aten::from_file"),
        ("torch.save(x, 'f')", "aten::save"),
        ("y = (ops.\n  foo.bar)(x)", "foo::bar"),
        ("y = torch.ops.c10d.allreduce_(x)", "c10d::allreduce_"),
        ("t = __torch__.torch.classes.foo.Bar()", "foo::Bar"),
        ("y = getattr(torch, 'from_' + 'file')", "getattr(torch"),
    ],
)
def test_the_source_scan_names_the_operator(source: str, op: str) -> None:
    assert op in (scan_source(source) or "")


def test_the_source_scan_passes_ordinary_code() -> None:
    assert scan_source("y = torch.relu(ops.quantized.linear(x, CONSTANTS.c0))\nz = torch.add(y, 1)\n") is None
