"""Models with integer and several inputs, through the real service: quantize and unstructured prune."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from tests.conftest import ApiClient
from tests.models import ImageAndIds, TokenLSTM, save_scripted

QUICK = {"evaluation": {"runs": 2, "warmup": 1}}


def _succeeded(api: ApiClient, job_id: str) -> tuple[dict, dict, torch.jit.ScriptModule]:
    job = api.wait(job_id, timeout=600)
    assert job["state"] == "succeeded", job["error"]
    report = api.session.get(api.url(job["links"]["report"]), timeout=60).json()
    body = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}, timeout=60).content
    return job, report, torch.jit.load(io.BytesIO(body))


def test_token_lstm_and_image_plus_ids_models_are_quantized_and_pruned(api: ApiClient, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokens = save_scripted(TokenLSTM(vocab=50), tmp_path / "tokens.pt")
    two = save_scripted(ImageAndIds(vocab=100), tmp_path / "two.pt")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "two.npz",
        input_0=rng.standard_normal((24, 3, 8, 8)).astype(np.float32),
        input_1=rng.integers(0, 100, (24, 6)),
    )  # int64 token ids stay int64
    declared = {"inputs": [{"shape": [4, 9], "dtype": "int64", "high": 50}]}
    submitted = {
        "tokens quantize": api.submit(tokens, {**QUICK, **declared, "method": "quantize"}),
        "tokens prune": api.submit(tokens, {**QUICK, **declared, "method": "prune", "prune": {"exclude": []}}),
        "two quantize": api.submit(two, {**QUICK, "method": "quantize"}, data=tmp_path / "two.npz"),
        "two prune": api.submit(
            two,
            {**QUICK, "method": "prune", "inputs": [{"shape": [1, 3, 8, 8]}, {"shape": [1, 6], "dtype": "int64"}]},
            data=tmp_path / "two.npz",
        ),
    }
    assert {name: r.status_code for name, r in submitted.items()} == dict.fromkeys(submitted, 202)
    ids, image, caption = torch.randint(0, 50, (3, 11)), torch.randn(5, 3, 8, 8), torch.randint(0, 100, (5, 4))

    job, report, model = _succeeded(api, submitted["tokens quantize"].json()["id"])
    assert {m["type"] for m in report["details"]["quantized_modules"]} == {"Embedding", "LSTM", "Linear"}
    assert report["latency"]["inputs"] == [{"shape": [4, 9], "dtype": "int64"}]
    assert report["fidelity"]["outputs"][0]["cosine_similarity"] > 0.99 and job["warnings"] == []
    assert model(ids).shape == (3, 50)

    job, report, model = _succeeded(api, submitted["tokens prune"].json()["id"])
    assert report["details"]["sparsity"] == 0.5 and job["warnings"] == []
    assert model(ids).shape == (3, 50)

    for name in ("two quantize", "two prune"):
        job, report, model = _succeeded(api, submitted[name].json()["id"])
        assert report["latency"]["inputs"] == [
            {"shape": [8, 3, 8, 8], "dtype": "float32"},
            {"shape": [8, 6], "dtype": "int64"},
        ]
        assert report["fidelity"]["inputs"] == "data file" and report["fidelity"]["samples"] == 24
        assert [o["name"] for o in report["fidelity"]["outputs"]] == ["output"]
        assert model(image, caption).shape == (5, 5)
    assert report["details"]["sparsity"] == 0.5  # the prune job's
