"""Pruning through the service: structured resnet-style channels, unstructured with gzip download."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from tests.conftest import ApiClient
from tests.models import DigitsCNN, ResidualNet, digits_splits, save_scripted, train_classifier


def test_structured_pruning_job_returns_a_smaller_model_with_the_same_outputs_shape(
    api: ApiClient, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    path = save_scripted(ResidualNet(width=32), tmp_path / "res.pt")
    spec = {
        "method": "prune",
        "input_shape": [2, 3, 16, 16],
        "evaluation": {"runs": 3, "warmup": 1},
        "prune": {"amount": 0.5, "structured": True},
    }

    job = api.wait(api.submit(path, spec).json()["id"], timeout=300)

    assert job["state"] == "succeeded", job["error"]
    body = api.session.get(api.url(job["links"]["model"])).content
    model = torch.jit.load(io.BytesIO(body))
    assert model(torch.randn(5, 3, 16, 16)).shape == (5, 4)
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["parameters"]["after"] < 0.35 * report["parameters"]["before"]
    assert report["details"]["macs"]["after"] < report["details"]["macs"]["before"]
    assert [g["channels_after"] for g in report["details"]["groups"]] == [16, 16]
    assert report["details"]["left_whole"][0]["group"] == "fc"


def test_unstructured_job_with_finetuning_and_gzip_download(api: ApiClient, tmp_path: Path) -> None:
    splits = digits_splits()
    model = train_classifier(DigitsCNN(width=16), splits["x_train"], splits["y_train"], epochs=8)
    path = save_scripted(model, tmp_path / "digits.pt")
    np.savez(tmp_path / "train.npz", inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
    spec = {
        "method": "prune",
        "evaluation": {"runs": 3, "warmup": 1},
        "prune": {"amount": 0.8, "finetune": {"epochs": 2, "batch_size": 64}},
    }

    job = api.wait(api.submit(path, spec, data=tmp_path / "train.npz").json()["id"], timeout=300)
    assert job["state"] == "succeeded", job["error"]

    plain = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"})
    packed = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "gzip"}, stream=True)
    raw = packed.raw.read()  # the bytes on the wire, not decoded
    assert packed.headers["Content-Encoding"] == "gzip" and "Content-Encoding" not in plain.headers
    assert len(raw) < 0.5 * len(plain.content)
    assert gzip.decompress(raw) == plain.content
    assert hashlib.sha256(plain.content).hexdigest() == packed.headers["X-Checksum-Sha256"] == job["result"]["sha256"]

    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["size"]["deflate_bytes_after"] < 0.5 * report["size"]["deflate_bytes_before"]
    assert abs(report["details"]["sparsity"] - 0.8) <= 0.005
    assert report["accuracy"]["after"] >= report["accuracy"]["before"] - 0.02
    assert [entry["epoch"] for entry in report["details"]["finetune"]] == [1, 2]
