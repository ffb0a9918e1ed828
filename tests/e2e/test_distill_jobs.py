"""Distillation through the HTTP API: an uploaded student and a torchvision-named one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import ApiClient
from tests.models import save_scripted


class TinyColorNet(nn.Module):
    """A 3x32x32 teacher with 5 classes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("distill-e2e")
    inputs = torch.randn(48, 3, 32, 32)
    np.savez(root / "data.npz", inputs=inputs.numpy(), labels=np.arange(48) % 5)
    return save_scripted(TinyColorNet(), root / "teacher.pt"), root / "data.npz"


SPEC = {
    "method": "distill",
    "evaluation": {"runs": 2, "warmup": 1},
    "distill": {"epochs": 2, "batch_size": 16, "val_fraction": 0.25},
}


def test_uploaded_student_trains_end_to_end(api: ApiClient, teacher_and_data, tmp_path: Path) -> None:
    teacher, data = teacher_and_data
    student = save_scripted(TinyColorNet(width=4), tmp_path / "student.pt")
    spec = {**SPEC, "distill": {**SPEC["distill"], "student": {"from": "upload"}}}

    response = api.submit(teacher, spec, data=data, student=student)
    assert response.status_code == 202, response.text
    assert response.json()["student"]["bytes"] == student.stat().st_size
    job = api.wait(response.json()["id"], timeout=300)

    assert job["state"] == "succeeded", job["error"]
    model = torch.jit.load(io.BytesIO(api.session.get(api.url(job["links"]["model"])).content))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in TinyColorNet(width=4).parameters())
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert [e["epoch"] for e in report["details"]["epochs"]] == [1, 2]
    assert report["details"]["samples"] == {"train": 36, "validation": 12}


def test_torchvision_student_trains_end_to_end(api: ApiClient, teacher_and_data) -> None:
    teacher, data = teacher_and_data
    spec = {
        **SPEC,
        "distill": {**SPEC["distill"], "epochs": 1, "student": {"from": "torchvision", "arch": "mobilenet_v3_small"}},
    }

    job = api.wait(api.submit(teacher, spec, data=data).json()["id"], timeout=300)

    assert job["state"] == "succeeded", job["error"]
    model = torch.jit.load(io.BytesIO(api.session.get(api.url(job["links"]["model"])).content))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["details"]["student"] == {"from": "torchvision", "arch": "mobilenet_v3_small"}
    # The job resource shows the spec as accepted: "from" (a Python keyword, another name inside) included.
    assert job["spec"]["distill"]["student"] == {"from": "torchvision", "arch": "mobilenet_v3_small"}
    listed = {entry["id"]: entry for entry in api.session.get(api.url("/v1/jobs")).json()["jobs"]}
    assert listed[job["id"]]["spec"]["distill"]["student"]["from"] == "torchvision"


def test_labels_of_the_wrong_length_fail_the_job_clearly(api: ApiClient, teacher_and_data, tmp_path: Path) -> None:
    teacher, _ = teacher_and_data
    np.savez(
        tmp_path / "bad.npz", inputs=np.zeros((10, 3, 32, 32), dtype=np.float32), labels=np.zeros(7, dtype=np.int64)
    )
    spec = {**SPEC, "distill": {**SPEC["distill"], "student": {"from": "width", "width": 0.5}}}

    job = api.wait(api.submit(teacher, spec, data=tmp_path / "bad.npz").json()["id"], timeout=120)

    assert job["state"] == "failed"
    assert "'labels' must be one class index per input: got shape [7] for 10 inputs" in job["error"]["detail"]


def test_student_with_other_outputs_fails_before_training(api: ApiClient, teacher_and_data, tmp_path: Path) -> None:
    teacher, data = teacher_and_data
    student = save_scripted(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), tmp_path / "three.pt")
    spec = {**SPEC, "distill": {**SPEC["distill"], "student": {"from": "upload"}}}

    job = api.wait(api.submit(teacher, spec, data=data, student=student).json()["id"], timeout=120)

    assert job["state"] == "failed"
    assert "differs from the teacher's [2, 5]" in job["error"]["detail"]
    assert job["started_at"] is not None and job["result"] is None
