"""Export targets through the real service: a job's artifacts listed, downloaded, and run on their
runtimes by a process that never imports torch (ExecuTorch's through its C++ runtime, ``pte_run``,
which ``make test`` builds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ApiClient
from tests.models import Eigen, ResidualNet, save_scripted, settle_batchnorm

TORCH_FREE = """
import sys
from workers.engine.targets.runner import main
code = main(sys.argv[1:])
assert 'torch' not in sys.modules, 'the runner imported torch'
sys.exit(code)
"""


@pytest.mark.parametrize("upload", ["torchscript", "pt2"])
def test_a_static_int8_job_serves_int8_artifacts_that_run_without_torch(
    api: ApiClient, tmp_path: Path, upload: str
) -> None:
    torch.manual_seed(0)
    original = settle_batchnorm(ResidualNet(width=16, classes=4), (16, 3, 16, 16))
    inputs = np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32)
    if upload == "pt2":
        path = tmp_path / "residual.pt2"
        torch.export.save(
            torch.export.export(
                original, (torch.from_numpy(inputs[:8]),), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},)
            ),
            path,
        )
    else:
        path = save_scripted(original, tmp_path / "residual.pt")
    np.savez(tmp_path / "data.npz", inputs=inputs)
    spec = {
        "method": "quantize",
        "quantize": {"mode": "static", "calibration_batches": 2},
        "evaluation": {"runs": 2, "warmup": 0},
        "targets": ["onnx", "openvino", "executorch"],
    }

    submitted = api.submit(path, spec, data=tmp_path / "data.npz")
    assert submitted.status_code == 202, submitted.text
    job = api.wait(submitted.json()["id"], timeout=900)
    assert job["state"] == "succeeded", job["error"]

    listed = api.session.get(api.url(job["links"]["artifacts"])).json()["artifacts"]
    assert [entry["name"] for entry in listed] == ["onnx", "openvino", "executorch"]
    with torch.no_grad():
        expected = original(torch.from_numpy(inputs[:8])).numpy()
    np.savez(tmp_path / "inputs.npz", input_0=inputs[:8])
    for entry in listed:
        assert entry["status"] == "succeeded" and entry["precision"].startswith("int8"), json.dumps(entry)
        body = api.session.get(api.url(entry["href"]), headers={"Accept-Encoding": "identity"}).content
        assert len(body) == entry["bytes"] > 0
        artifact = tmp_path / f"artifact-{entry['name']}"
        artifact.write_bytes(body)
        outputs = tmp_path / f"outputs-{entry['name']}.npz"
        ran = subprocess.run(
            [
                sys.executable,
                "-c",
                TORCH_FREE,
                entry["name"],
                str(artifact),
                str(tmp_path / "inputs.npz"),
                str(outputs),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        got = np.load(outputs)["output_0"]
        cosine = float(np.dot(got.ravel(), expected.ravel()) / (np.linalg.norm(got) * np.linalg.norm(expected)))
        assert got.shape == expected.shape and cosine >= 0.98, (entry["name"], cosine)

    report = api.session.get(api.url(job["links"]["report"])).json()
    assert set(report["targets"]) == {"onnx", "openvino", "executorch"}
    assert all(t["fidelity"]["cosine_similarity"] >= 0.98 for t in report["targets"].values()), report["targets"]
    assert not [w for w in report["warnings"] if w.startswith("target")]


def test_a_target_the_model_cannot_take_fails_alone_and_is_not_served(api: ApiClient, tmp_path: Path) -> None:
    path = save_scripted(Eigen(), tmp_path / "eigen.pt")
    submitted = api.submit(
        path, {"method": "quantize", "input_shape": [4, 6], "targets": ["onnx"], "evaluation": {"runs": 1, "warmup": 0}}
    )
    job = api.wait(submitted.json()["id"], timeout=600)

    assert job["state"] == "succeeded", job["error"]  # the main result
    assert any(w.startswith("target onnx failed") and "eig" in w for w in job["warnings"]), job["warnings"]
    listed = api.session.get(api.url(job["links"]["artifacts"])).json()["artifacts"]
    assert listed[0]["status"] == "failed" and "eig" in listed[0]["reason"]
    refused = api.session.get(api.url(job["links"]["artifacts"]) + "/onnx")
    assert refused.status_code == 404 and "eig" in json.dumps(refused.json())
