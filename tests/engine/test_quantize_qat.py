"""Quantization-aware training (``quantize.mode: "qat"``) on real data (scikit-learn's digits): it trains,
ends in the same int8 kernels as static, scores float / static PTQ / QAT on held-out rows and returns
the better; TorchScript (fake-quantized weights) and ``.pt2`` (PT2E's QAT flow) alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchao  # noqa: F401  (registers the quantized_decomposed ops an int8 program needs to load)

from modelpress.spec import parse_spec
from tests.models import SeparableDigitsCNN, digits_splits, save_scripted, test_accuracy, train_classifier
from workers.engine.methods.quantize.qat import fake_quantize_weight
from workers.engine.methods.quantize.static import quantized_op_counts
from workers.engine.run.pipeline import compress

ROWS = 600  # training rows: enough to learn the digits, few enough to keep QAT short


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    splits = digits_splits(0)
    torch.manual_seed(0)
    model = train_classifier(SeparableDigitsCNN(), splits["x_train"], splits["y_train"], epochs=12)
    root = tmp_path_factory.mktemp("qat")
    np.savez(root / "digits.npz", inputs=splits["x_train"][:ROWS].numpy(), labels=splits["y_train"][:ROWS].numpy())
    return {
        **splits,
        "model": model,
        "root": root,
        "data": root / "digits.npz",
        "scripted": save_scripted(model, root / "separable.pt"),
    }


def _spec(**quantize: object) -> dict:
    return parse_spec(
        {"method": "quantize", "quantize": quantize, "seed": 0, "evaluation": {"runs": 2, "warmup": 1}}, has_data=True
    )


def test_fake_quantized_weights_are_what_static_int8_stores() -> None:
    for seed in range(5):
        weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(seed))
        # What convert_jit stores: torch's symmetric qint8 observers' scale, max |w| over half of [-128, 127].
        scales = weight.abs().amax(dim=(1, 2, 3)) / 127.5
        stored = torch.quantize_per_channel(weight, scales, torch.zeros(6, dtype=torch.long), 0, torch.qint8)
        assert torch.equal(fake_quantize_weight(weight, True), stored.dequantize())
        stored = torch.quantize_per_tensor(weight, float(weight.abs().max() / 127.5), 0, torch.qint8)
        assert torch.equal(fake_quantize_weight(weight, False), stored.dequantize())


def test_torchscript_qat_trains_and_ends_in_static_int8_kernels(digits: dict, tmp_path: Path) -> None:
    static = compress(
        digits["scripted"], _spec(mode="static", per_channel=False), tmp_path / "static.pt", data_path=digits["data"]
    )
    report = compress(
        digits["scripted"],
        _spec(mode="qat", per_channel=False, qat={"epochs": 2}),
        tmp_path / "qat.pt",
        data_path=digits["data"],
    )

    qat = report["details"]["qat"]
    assert report["details"]["mode"] == "qat" and [e["epoch"] for e in qat["epochs"]] == [1, 2]
    assert all(e["train_loss"] > 0 for e in qat["epochs"])
    assert qat["fake_quantized_weights"] == 6  # stem, two depthwise, two pointwise convolutions and the head
    scores = qat["validation"]
    assert scores["measure"] == "accuracy" and scores["rows"] == round(0.2 * ROWS)
    assert set(scores) >= {"float", "static_ptq", "qat"} and scores["float"] >= 0.9
    assert qat["returned"] == ("qat" if scores["qat"] >= scores["static_ptq"] else "static_ptq")
    result = torch.jit.load(str(tmp_path / "qat.pt"))
    # The same int8 kernels as static: quantized convolutions and linear, nothing left float.
    assert quantized_op_counts(result) == static["details"]["quantized_ops"]
    assert report["size"]["ratio"] == pytest.approx(static["size"]["ratio"], rel=0.05)
    assert test_accuracy(result, digits["x_test"], digits["y_test"]) >= 0.9


def test_pt2_qat_uses_pt2e_and_loads_as_an_int8_program(digits: dict, tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", max=4096)
    program = torch.export.export(digits["model"].eval(), (digits["x_train"][:8],), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "separable.pt2")
    report = compress(
        tmp_path / "separable.pt2", _spec(mode="qat", qat={"epochs": 1}), tmp_path / "out.pt2", data_path=digits["data"]
    )

    qat = report["details"]["qat"]
    assert report["details"]["mode"] == "qat" and len(qat["epochs"]) == 1
    assert "prepare_qat_pt2e" in " ".join(qat["notes"])
    assert qat["returned"] in ("qat", "static_ptq")
    result = torch.export.load(tmp_path / "out.pt2")
    targets = [str(node.target) for node in result.graph.nodes if node.op == "call_function"]
    assert targets.count("quantized_decomposed.dequantize_per_channel.default") == 6  # every weight int8
    # Every BatchNorm folded into its convolution (the fold runs only for the convolution kinds present).
    assert not [target for target in targets if "batch_norm" in target]
    assert test_accuracy(result.module(), digits["x_test"], digits["y_test"]) >= 0.9
