"""Static int8 quantization on real TorchScript models, without the service."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.models import save_scripted, test_accuracy
from workers.engine.methods.quantize.static import quantized_op_counts
from workers.engine.run.pipeline import compress


def _spec(**quantize: object) -> dict:
    return {
        "method": "quantize",
        "seed": 0,
        "evaluation": {"runs": 2, "warmup": 1},
        "quantize": {
            "mode": "static",
            "dtype": "qint8",
            "modules": ["Conv1d", "Conv2d", "Conv3d", "Linear"],
            "exclude": [],
            "per_channel": True,
            "observer": "histogram",
            "reduce_range": True,
            "calibration_batches": 4,
            "min_cosine": 0.99,
            **quantize,
        },
    }


def test_trained_digits_cnn_keeps_its_accuracy_in_int8(digits: dict, tmp_path: Path) -> None:
    report = compress(digits["model"], _spec(), tmp_path / "out.pt", data_path=digits["unlabelled"])

    model = torch.jit.load(str(tmp_path / "out.pt"))  # plain torch, as a user loads it
    ops = quantized_op_counts(model)
    assert ops.get("quantized::conv2d_relu", 0) + ops.get("quantized::conv2d", 0) == 3  # BatchNorm folded, relu fused
    assert ops.get("quantized::linear") == 1
    assert "aten::conv2d" not in str(model.graph) and "aten::batch_norm" not in str(model.graph)
    # One test image is 0.22 points; a 0.5 point bound allows two flips either way, on any x86 CPU.
    assert test_accuracy(model, digits["x_test"], digits["y_test"]) >= digits["accuracy"] - 0.005
    assert report["size"]["ratio"] < 0.30
    details = report["details"]
    assert details["mode"] == "static" and details["calibration"]["source"] == "data file"
    assert details["calibration"]["samples"] == 4 * 32 and details["fallback"] == []
    assert {m["module"] for m in details["quantized_modules"]} == {
        "features.0",
        "features.3",
        "features.7",
        "classifier",
    }
    assert report["warnings"] == []


class SpikyNet(nn.Module):
    """One conv emits a channel 10^4 times larger than the rest: one activation scale per tensor cannot hold both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.spiky = nn.Conv2d(16, 16, 3, padding=1)
        # No biases after the spike: the outputs must depend on what the spike drowns, not on constants.
        self.mix = nn.Conv2d(16, 16, 1, bias=False)
        self.tail = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 4, bias=False)
        with torch.no_grad():
            self.spiky.weight[0] *= 1e4
            self.mix.weight[:, 0] /= 1e6  # the spike itself barely reaches the output: the rest carries it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.tail(torch.relu(self.mix(self.spiky(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_layers_that_break_the_outputs_fall_back_to_float_until_the_floor_is_met(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_scripted(SpikyNet(), tmp_path / "spiky.pt")
    np.savez(tmp_path / "data.npz", inputs=np.random.default_rng(0).standard_normal((64, 3, 12, 12)).astype(np.float32))

    report = compress(
        path, _spec(observer="minmax", min_cosine=0.99), tmp_path / "out.pt", data_path=tmp_path / "data.npz"
    )

    details = report["details"]
    assert details["cosine_all_layers_int8"] < 0.99  # the fault is real: all-int8 misses the floor
    fallback = {entry["module"] for entry in details["fallback"]}
    assert "mix" in fallback  # its input holds the spike
    assert {"stem", "fc"} - fallback  # and not everything went back to float
    kept = {entry["module"]: entry["reason"] for entry in details["kept_float"]}
    assert all(kept[name].startswith("fallback") for name in fallback)
    assert report["fidelity"]["cosine_similarity"] >= 0.99
    assert quantized_op_counts(torch.jit.load(str(tmp_path / "out.pt")))


def test_traced_model_with_functional_ops_and_random_calibration_warns(tmp_path: Path) -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.relu(nn.functional.conv2d(x, self.weight, padding=1))
            return self.head(nn.functional.dropout(y.mean(dim=(2, 3)), 0.1, self.training))

    torch.manual_seed(0)
    model = Functional().eval()
    traced = torch.jit.trace(model, torch.randn(2, 3, 10, 10))
    path = tmp_path / "traced.pt"
    traced.save(str(path))

    report = compress(path, {**_spec(), "input_shape": [4, 3, 10, 10]}, tmp_path / "out.pt")

    result = torch.jit.load(str(tmp_path / "out.pt"))
    ops = quantized_op_counts(result)
    assert ops.get("quantized::conv2d_relu", 0) + ops.get("quantized::conv2d", 0) == 1 and ops["quantized::linear"] == 1
    assert report["details"]["calibration"]["source"] == "random inputs of input_shape"
    assert any("random inputs" in warning for warning in report["warnings"])
    assert report["fidelity"]["cosine_similarity"] >= 0.99
    buffer = io.BytesIO()
    torch.jit.save(result, buffer)
    assert len(buffer.getvalue()) < path.stat().st_size


def test_every_stochastic_depth_of_efficientnet_folds_away_before_quantization() -> None:
    # 16 block classes share torchvision's StochasticDepth; each method graph must see training=False.
    import torchvision

    from modelpress.options import method_options
    from workers.engine.inputs import Dataset
    from workers.engine.methods.quantize.torchscript import quantize

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torchvision.models.efficientnet_b0(weights=None).eval()), buffer)
    buffer.seek(0)
    options = method_options(
        "quantize", {**_spec()["quantize"], "observer": "minmax", "calibration_batches": 1, "min_cosine": 0.0}
    )

    result, details = quantize(torch.jit.load(buffer), options, Dataset(inputs=torch.randn(2, 3, 32, 32)))

    assert details["counts"]["static"] == 82  # every conv and the classifier
    assert quantized_op_counts(result).get("quantized::conv2d", 0) > 0
