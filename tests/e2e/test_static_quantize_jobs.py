"""A static int8 job through the real service: upload a CNN and its data, download an int8 model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from tests.conftest import ApiClient
from tests.models import ResidualNet, save_scripted, settle_batchnorm


def test_static_job_with_a_data_file_returns_an_int8_model(api: ApiClient, tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = settle_batchnorm(ResidualNet(width=16, classes=4), (16, 3, 16, 16))
    path = save_scripted(original, tmp_path / "residual.pt")
    inputs = np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", inputs=inputs)
    spec = {
        "method": "quantize",
        "quantize": {"mode": "static", "observer": "minmax", "calibration_batches": 2},
        "evaluation": {"runs": 2, "warmup": 1},
    }

    submitted = api.submit(path, spec, data=tmp_path / "data.npz")
    assert submitted.status_code == 202, submitted.text
    job = api.wait(submitted.json()["id"], timeout=600)

    assert job["state"] == "succeeded", job["error"]
    assert job["spec"]["quantize"]["min_cosine"] == 0.99 and job["spec"]["quantize"]["reduce_range"] is True
    body = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}).content
    model = torch.jit.load(io.BytesIO(body))
    graph = str(model.graph)
    assert "quantized::conv2d" in graph and "quantized::linear" in graph and "aten::batch_norm" not in graph
    x = torch.from_numpy(inputs[:32])
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(x).flatten(), original(x).flatten(), dim=0)
    assert float(cosine) >= 0.99
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["details"]["mode"] == "static" and report["details"]["calibration"]["source"] == "data file"
    assert report["details"]["calibration"]["samples"] == 64
    assert report["fidelity"]["cosine_similarity"] >= 0.99
    assert report["warnings"] == []


def test_static_options_in_dynamic_mode_are_refused_by_name(api: ApiClient, tmp_path: Path) -> None:
    path = save_scripted(ResidualNet(), tmp_path / "residual.pt")
    response = api.submit(path, {"method": "quantize", "input_shape": [2, 3, 8, 8], "quantize": {"observer": "minmax"}})

    assert response.status_code == 422
    assert response.json()["errors"] == {"spec.quantize.observer": ["only used when mode is 'static' or 'qat'"]}


def test_qat_job_trains_on_the_uploaded_data_and_returns_int8(api: ApiClient, tmp_path: Path) -> None:
    """Unlabelled data: QAT trains on agreement with the float model and is scored by top-1 agreement."""
    torch.manual_seed(0)
    original = settle_batchnorm(ResidualNet(width=16, classes=4), (16, 3, 16, 16))
    path = save_scripted(original, tmp_path / "residual.pt")
    np.savez(tmp_path / "data.npz", inputs=np.random.default_rng(0).standard_normal((80, 3, 16, 16)).astype(np.float32))
    spec = {
        "method": "quantize",
        "quantize": {"mode": "qat", "qat": {"epochs": 1, "batch_size": 16}},
        "evaluation": {"runs": 2, "warmup": 1},
    }

    submitted = api.submit(path, spec, data=tmp_path / "data.npz")
    assert submitted.status_code == 202, submitted.text
    job = api.wait(submitted.json()["id"], timeout=600)

    assert job["state"] == "succeeded", job["error"]
    report = api.session.get(api.url(job["links"]["report"])).json()
    qat = report["details"]["qat"]
    assert report["details"]["mode"] == "qat" and [e["epoch"] for e in qat["epochs"]] == [1]
    assert qat["validation"]["measure"] == "top1_agreement" and qat["validation"]["rows"] == 16
    assert qat["validation"]["float"] == 1.0 and qat["returned"] in ("qat", "static_ptq")
    body = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}).content
    assert "quantized::conv2d" in str(torch.jit.load(io.BytesIO(body)).graph)
