"""Upload -> queue -> worker -> download, with real models, a real worker and real Redis."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from tests.conftest import ApiClient
from tests.models import LinearTransformer, Recurrent, SmallConvNet, save_scripted, transformer_encoder


def _download(api: ApiClient, job: dict) -> tuple[torch.jit.ScriptModule, bytes]:
    response = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}, timeout=120)
    assert response.status_code == 200
    body = response.content
    digest = hashlib.sha256(body).hexdigest()
    assert response.headers["X-Checksum-Sha256"] == digest == job["result"]["sha256"]
    assert response.headers["ETag"].strip('"') == digest
    assert len(body) == job["result"]["bytes"]
    return torch.jit.load(io.BytesIO(body)), body


def _compress(api: ApiClient, path: Path, spec: dict) -> tuple[dict, torch.jit.ScriptModule, bytes]:
    """Submit, wait for success, download: the job, the loaded result and its bytes."""
    submitted = api.submit(path, spec)
    assert submitted.status_code == 202, submitted.text
    job = api.wait(submitted.json()["id"], timeout=600)
    assert job["state"] == "succeeded", job["error"]
    model, body = _download(api, job)
    return job, model, body


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_linear_heavy_transformer_end_to_end(api: ApiClient, tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = LinearTransformer(width=512, blocks=6).eval()
    path = save_scripted(original, tmp_path / "transformer.pt")
    spec = {"method": "quantize", "input_shape": [4, 32, 512], "evaluation": {"runs": 5, "warmup": 2}}

    job, model, body = _compress(api, path, spec)

    assert job["progress"] == 1.0 and job["started_at"] and job["finished_at"]
    assert len(body) <= 0.27 * path.stat().st_size
    x = torch.randn(3, 20, 512)
    with torch.no_grad():
        assert _cosine(model(x), original(x)) >= 0.999

    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["size"]["bytes_after"] == len(body)
    assert report["fidelity"]["cosine_similarity"] >= 0.999
    assert report["details"]["counts"]["dynamic"] == 6 * 5 + 1
    assert report["latency"]["before_ms"] > 0 and report["latency"]["after_ms"] > 0
    assert job["result"]["size_ratio"] == report["size"]["ratio"]

    # Downloads are conditional on the ETag.
    again = api.session.get(
        api.url(job["links"]["model"]),
        headers={"If-None-Match": f'"{job["result"]["sha256"]}"', "Accept-Encoding": "identity"},
    )
    assert again.status_code == 304


def test_scripted_transformer_encoder_gets_int8_attention_projections(api: ApiClient, tmp_path: Path) -> None:
    original = transformer_encoder(width=512, layers=6).eval()
    path = save_scripted(original, tmp_path / "encoder.pt")
    spec = {
        "method": "quantize",
        "input_shape": [2, 16, 512],
        "evaluation": {"runs": 3, "warmup": 1},
        "quantize": {"modules": ["Linear", "MultiheadAttention"]},
    }

    job, model, body = _compress(api, path, spec)

    assert len(body) <= 0.30 * path.stat().st_size
    x = torch.randn(2, 16, 512)
    with torch.no_grad():
        assert _cosine(model(x), original(x)) >= 0.999
    report = api.session.get(api.url(job["links"]["report"])).json()
    kernels = {m["module"]: m["kernel"] for m in report["details"]["quantized_modules"]}
    assert len(kernels) == 6 * 4 and set(kernels.values()) == {"dynamic"}
    assert {f"layers.{i}.self_attn" for i in range(6)} <= set(kernels)
    assert {entry["type"] for entry in report["details"]["kept_float"]} == {"LayerNorm"}


def test_data_file_supplies_the_inputs(api: ApiClient, tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = Recurrent(features=16, hidden=64).eval()
    path = save_scripted(original, tmp_path / "rnn.pt")
    inputs = np.random.default_rng(0).standard_normal((40, 12, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", inputs=inputs)

    job = api.wait(
        api.submit(
            path, {"method": "quantize", "evaluation": {"runs": 3, "warmup": 1}}, data=tmp_path / "data.npz"
        ).json()["id"]
    )

    assert job["state"] == "succeeded", job["error"]
    assert job["data"]["bytes"] == (tmp_path / "data.npz").stat().st_size
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["fidelity"]["samples"] == 40 and report["fidelity"]["inputs"] == "data file"
    assert report["latency"]["batch_shape"] == [8, 12, 16]
    model, _ = _download(api, job)
    with torch.no_grad():
        assert _cosine(model(torch.from_numpy(inputs)), original(torch.from_numpy(inputs))) > 0.999


def test_input_shape_that_does_not_fit_fails_the_job_readably(api: ApiClient, tmp_path: Path) -> None:
    path = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    job = api.wait(api.submit(path, {"method": "quantize", "input_shape": [1, 4, 8, 8]}).json()["id"])

    assert job["state"] == "failed"
    assert job["error"]["title"] == "Invalid input"
    assert "shape [1, 4, 8, 8]" in job["error"]["detail"]
    assert "channels" in job["error"]["detail"]
    assert job["result"] is None and "model" not in job["links"]
    assert api.session.get(api.url(f"/v1/jobs/{job['id']}/model")).status_code == 409


def test_data_file_with_wrong_arrays_fails_the_job_readably(api: ApiClient, tmp_path: Path) -> None:
    path = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    np.savez(tmp_path / "data.npz", images=np.zeros((4, 3, 8, 8), dtype=np.float32))
    job = api.wait(api.submit(path, {"method": "quantize"}, data=tmp_path / "data.npz").json()["id"])

    assert job["state"] == "failed"
    assert "no array named 'inputs' (arrays found: images)" in job["error"]["detail"]
