"""Bad models and bad inputs become typed errors with readable messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.models import SmallConvNet, save_scripted
from workers.engine.errors import InvalidInput, InvalidModel
from workers.engine.formats.torchscript import load_model
from workers.engine.inputs import load_dataset
from workers.engine.run.pipeline import compress

SPEC = {"method": "quantize", "input_shape": [2, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}, "quantize": {}}


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(InvalidModel, match="empty"):
        load_model(tmp_path / "m.pt")


def test_random_bytes(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InvalidModel, match="not a TorchScript archive"):
        load_model(tmp_path / "m.pt")


def test_torch_save_pickle_is_explained(tmp_path: Path) -> None:
    torch.save(nn.Linear(4, 2), tmp_path / "m.pt")
    with pytest.raises(InvalidModel, match=r"torch\.save\(\) checkpoint.*torch\.jit\.script"):
        load_model(tmp_path / "m.pt")


def test_truncated_archive(tmp_path: Path) -> None:
    whole = save_scripted(SmallConvNet(), tmp_path / "whole.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidModel, match="truncated"):
        load_model(tmp_path / "m.pt")


def test_input_shape_that_does_not_fit_names_the_shape(tmp_path: Path) -> None:
    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    spec = {**SPEC, "input_shape": [2, 5, 8, 8]}
    with pytest.raises(InvalidInput, match=r"shape \[2, 5, 8, 8\]"):
        compress(model, spec, tmp_path / "out.pt")


def test_data_file_without_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(InvalidInput, match=r"no array named 'inputs' \(arrays found: x\)"):
        load_dataset(tmp_path / "d.npz")


def test_labels_of_the_wrong_length(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 3), dtype=np.float32), labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(InvalidInput, match=r"shape \[3\] for 4 inputs"):
        load_dataset(tmp_path / "d.npz")


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidInput, match="pickled"):
        load_dataset(tmp_path / "d.npz")


def test_safetensors_data_drives_the_measurements(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    save_file(
        {"inputs": np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)},
        str(tmp_path / "d.safetensors"),
    )
    spec = {k: v for k, v in SPEC.items() if k != "input_shape"}
    report = compress(model, spec, tmp_path / "out.pt", data_path=tmp_path / "d.safetensors")

    assert report["fidelity"]["samples"] == 20
    assert report["latency"]["batch_shape"] == [8, 3, 8, 8]
