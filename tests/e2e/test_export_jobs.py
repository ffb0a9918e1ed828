"""torch.export programs (.pt2) through the real service: a .pt2 in, a .pt2 out; crafted archives refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modelpress.client import Client
from tests.conftest import ApiClient
from tests.exported_archives import save_exported, with_payload_in_sample_inputs
from tests.models import LinearTransformer


def test_a_program_is_quantized_and_comes_back_as_a_program(api: ApiClient, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LinearTransformer(width=256, blocks=2).eval()
    path = save_exported(model, torch.randn(4, 16, 256), tmp_path / "transformer.pt2")
    spec = {"method": "quantize", "input_shape": [4, 16, 256], "evaluation": {"runs": 3, "warmup": 1}}

    client = Client(api.base_url)  # what the modelpress command uses: the file's bytes and its name
    submitted = client.submit(path, spec)
    assert submitted["input"]["format"] == "pt2" and submitted["input"]["filename"] == "transformer.pt2"
    job = client.wait(submitted, timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert job["result"]["format"] == "pt2"

    response = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}, timeout=120)
    assert response.status_code == 200
    assert "filename=transformer.quantize.pt2" in response.headers["Content-Disposition"]
    downloaded = client.download(job, tmp_path / "transformer.quantize.pt2")  # checks the SHA-256
    assert downloaded.read_bytes() == response.content
    assert len(response.content) <= 0.30 * path.stat().st_size
    import torchao  # noqa: F401  (registers the quantized_decomposed operators the int8 program calls)

    program = torch.export.load(downloaded)
    x = torch.randn(3, 16, 256)
    with torch.no_grad():
        got, expected = program.module()(x), model(x)
    assert got.shape == expected.shape == (3, 10)
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)) >= 0.999
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["format"] == {"input": "pt2", "output": "pt2"}
    assert report["size"]["bytes_after"] == len(response.content)


def test_a_program_carrying_a_pickle_payload_is_refused_at_submit_and_never_runs(
    api: ApiClient, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    genuine = save_exported(LinearTransformer(width=64, blocks=1).eval(), torch.randn(2, 8, 64), tmp_path / "g.pt2")
    marker = tmp_path / "payload-ran"
    before = [job["id"] for job in api.session.get(api.url("/v1/jobs?limit=100")).json()["jobs"]]

    response = api.submit(
        with_payload_in_sample_inputs(genuine, marker),
        {"method": "quantize", "input_shape": [2, 8, 64]},
        filename="innocent.pt2",
    )

    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "pickle" in " ".join(response.json()["errors"]["model"])
    after = [job["id"] for job in api.session.get(api.url("/v1/jobs?limit=100")).json()["jobs"]]
    assert after == before  # nothing was queued
    assert not marker.exists()


def test_a_student_in_another_format_than_its_teacher_is_refused_at_submit(api: ApiClient, tmp_path: Path) -> None:
    from tests.models import save_scripted

    teacher = save_scripted(LinearTransformer(width=64, blocks=1).eval(), tmp_path / "teacher.pt")
    student = save_exported(
        LinearTransformer(width=32, blocks=1).eval(), torch.randn(2, 8, 32), tmp_path / "student.pt2"
    )
    data = tmp_path / "data.npz"
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((16, 8, 64)).astype(np.float32))
    response = api.submit(
        teacher,
        {"method": "distill", "distill": {"student": {"from": "upload"}, "epochs": 1}},
        data=data,
        student=student,
    )
    assert response.status_code == 422, response.text
    assert "same format" in " ".join(response.json()["errors"].get("student", [])), response.text


def test_a_program_teacher_distils_into_a_program_student_through_the_api(api: ApiClient, tmp_path: Path) -> None:
    from tests.e2e.test_distill_jobs import TinyColorNet

    torch.manual_seed(0)
    teacher_model = TinyColorNet(width=16).eval()
    teacher = save_exported(teacher_model, torch.randn(4, 3, 32, 32), tmp_path / "teacher.pt2")
    student_model = TinyColorNet(width=4).eval()
    student = save_exported(student_model, torch.randn(4, 3, 32, 32), tmp_path / "student.pt2")
    inputs = torch.randn(48, 3, 32, 32)
    data = tmp_path / "data.npz"
    np.savez(data, inputs=inputs.numpy())  # unlabelled: the student learns the teacher's answers
    spec = {
        "method": "distill",
        "evaluation": {"runs": 2, "warmup": 1},
        "distill": {"student": {"from": "upload"}, "epochs": 3, "batch_size": 16, "lr": 0.01, "val_fraction": 0.25},
    }

    response = api.submit(teacher, spec, data=data, student=student)
    assert response.status_code == 202, response.text
    assert response.json()["input"]["format"] == response.json()["student"]["format"] == "pt2"
    job = api.wait(response.json()["id"], timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert job["result"]["format"] == "pt2"

    download = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}, timeout=120)
    assert download.headers["Content-Disposition"].endswith(".distill.pt2")  # the format's suffix
    (tmp_path / "out.pt2").write_bytes(download.content)
    program = torch.export.load(tmp_path / "out.pt2")  # plain torch loads the trained student
    trained = dict(program.state_dict)
    assert sorted(trained) == sorted(dict(student_model.named_parameters()))  # the student's shape, not the teacher's
    assert any(not torch.equal(trained[name], weight) for name, weight in student_model.named_parameters())  # trained
    x = torch.randn(7, 3, 32, 32)  # a batch size never seen: the teacher's dynamic batch axis was kept
    with torch.no_grad():
        assert program.module()(x).shape == (7, 5)
    report = api.session.get(api.url(job["links"]["report"])).json()
    assert report["format"] == {"input": "pt2", "output": "pt2"}
    assert [entry["epoch"] for entry in report["details"]["epochs"]] == [1, 2, 3]
    assert report["parameters"]["after"] == sum(p.numel() for p in student_model.parameters())


def test_a_job_can_return_an_aoti_package_of_its_result(api: ApiClient, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)).eval()
    path = save_exported(model, torch.randn(4, 32), tmp_path / "mlp.pt2")
    spec = {
        "method": "quantize",
        "quantize": {"dtype": "float16"},
        "input_shape": [4, 32],
        "package": "aoti",
        "evaluation": {"runs": 2, "warmup": 1},
    }

    response = api.submit(path, spec, filename="mlp.pt2")
    assert response.status_code == 202, response.text
    job = api.wait(response.json()["id"], timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert job["result"]["format"] == "aoti"

    download = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}, timeout=120)
    assert "filename=mlp.quantize.aoti.pt2" in download.headers["Content-Disposition"]
    (tmp_path / "mlp.quantize.aoti.pt2").write_bytes(download.content)
    compiled = torch._inductor.aoti_load_package(str(tmp_path / "mlp.quantize.aoti.pt2"))
    x = torch.randn(6, 32)
    with torch.no_grad():
        got, expected = compiled(x), model(x)
    assert got.shape == expected.shape == (6, 4)
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)) >= 0.999
