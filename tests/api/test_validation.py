"""Every bad request gets a clear problem+json answer from the running API, never a 500."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.spec import dump_spec, parse_spec
from tests.conftest import ApiClient
from tests.models import SmallConvNet, scripted_bytes

GOOD_SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8]}


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    torch.manual_seed(0)
    return scripted_bytes(SmallConvNet())


def _problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["type"].startswith("https://")
    return body


def test_spec_that_is_not_json(api: ApiClient, model_bytes: bytes) -> None:
    body = _problem(api.submit(model_bytes, "{method: quantize"), 422)
    assert "not valid JSON" in body["errors"]["spec"][0]


def test_unknown_field_is_named(api: ApiClient, model_bytes: bytes) -> None:
    body = _problem(api.submit(model_bytes, {**GOOD_SPEC, "quantise": {}}), 422)
    assert body["errors"] == {"spec.quantise": ["Unknown field."]}


def test_unknown_nested_field_is_named(api: ApiClient, model_bytes: bytes) -> None:
    body = _problem(api.submit(model_bytes, {**GOOD_SPEC, "quantize": {"bits": 4}}), 422)
    assert body["errors"] == {"spec.quantize.bits": ["Unknown field."]}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**GOOD_SPEC, "quantize": {"dtype": "int4"}}, "spec.quantize.dtype"),
        ({**GOOD_SPEC, "input_shape": [1, 0, 8]}, "spec.input_shape.1"),
        ({**GOOD_SPEC, "evaluation": {"runs": 5000}}, "spec.evaluation.runs"),
        ({**GOOD_SPEC, "method": "sharpen"}, "spec.method"),
        ({"method": "quantize"}, "spec.input_shape"),
        ({**GOOD_SPEC, "quantize": {"modules": ["Conv2d"]}}, "spec.quantize.modules.0"),
    ],
)
def test_out_of_range_values_are_named(api: ApiClient, model_bytes: bytes, spec: dict, field: str) -> None:
    body = _problem(api.submit(model_bytes, spec), 422)
    assert list(body["errors"]) == [field]
    assert field in body["detail"]


def test_missing_model(api: ApiClient) -> None:
    response = api.session.post(api.url("/v1/jobs"), files={"other": ("x", b"x")}, data={"spec": json.dumps(GOOD_SPEC)})
    body = _problem(response, 422)
    assert "required" in body["errors"]["model"][0]


def test_missing_spec(api: ApiClient, model_bytes: bytes) -> None:
    response = api.session.post(api.url("/v1/jobs"), files={"model": ("m.pt", model_bytes)})
    assert "required" in _problem(response, 422)["errors"]["spec"][0]


def test_spec_may_come_as_a_file_part(api: ApiClient, model_bytes: bytes) -> None:
    response = api.session.post(
        api.url("/v1/jobs"),
        files={"model": ("m.pt", model_bytes), "spec": ("spec.json", json.dumps(GOOD_SPEC).encode())},
    )
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["input_shape"] == [1, 3, 8, 8]


def test_empty_model_file(api: ApiClient) -> None:
    body = _problem(api.submit(b"", GOOD_SPEC), 422)
    assert body["errors"]["model"] == ["the file is empty"]


def test_random_bytes(api: ApiClient) -> None:
    body = _problem(api.submit(np.random.default_rng(1).bytes(10_000), GOOD_SPEC), 422)
    assert "not a TorchScript archive" in body["errors"]["model"][0]


def test_torch_save_pickle(api: ApiClient, tmp_path: Path) -> None:
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "ckpt.pt")
    body = _problem(api.submit(tmp_path / "ckpt.pt", GOOD_SPEC), 422)
    assert "torch.save() checkpoint" in body["errors"]["model"][0]
    assert "torch.jit.script" in body["errors"]["model"][0]


def test_truncated_archive(api: ApiClient, model_bytes: bytes) -> None:
    body = _problem(api.submit(model_bytes[: len(model_bytes) // 2], GOOD_SPEC), 422)
    assert "truncated" in body["errors"]["model"][0]


def test_not_multipart(api: ApiClient) -> None:
    _problem(api.session.post(api.url("/v1/jobs"), json=GOOD_SPEC), 415)


def test_upload_over_the_limit_is_413_before_the_body_is_read(api: ApiClient, stack) -> None:
    limit = stack.settings.max_upload_mb << 20
    address = urlparse(api.base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.putrequest("POST", "/v1/jobs")
    connection.putheader("Content-Type", "multipart/form-data; boundary=xyz")
    connection.putheader("Content-Length", str(limit + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert response.getheader("Content-Type") == "application/problem+json"
    assert "MODELPRESS_MAX_UPLOAD_MB" in json.loads(response.read())["detail"]
    connection.close()


def test_unknown_job_is_404(api: ApiClient) -> None:
    for path in ("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV", "/v1/jobs/not-an-id", "/v1/jobs/not-an-id/model"):
        assert "no job" in _problem(api.session.get(api.url(path)), 404)["detail"]


def test_bad_list_arguments(api: ApiClient) -> None:
    body = _problem(api.session.get(api.url("/v1/jobs?state=sleeping")), 422)
    assert "state" in body["errors"]
    body = _problem(api.session.get(api.url("/v1/jobs?limit=0")), 422)
    assert "limit" in body["errors"]


def test_unknown_route_and_method(api: ApiClient) -> None:
    _problem(api.session.get(api.url("/v2/nothing")), 404)
    _problem(api.session.put(api.url("/v1/jobs")), 405)


@pytest.mark.parametrize("amount", [0, 1, 1.5, -0.2])
def test_prune_amount_out_of_range(api: ApiClient, model_bytes: bytes, amount: float) -> None:
    spec = {"method": "prune", "input_shape": [1, 3, 8, 8], "prune": {"amount": amount}}
    body = _problem(api.submit(model_bytes, spec), 422)
    assert list(body["errors"]) == ["spec.prune.amount"]


def test_prune_finetune_without_data(api: ApiClient, model_bytes: bytes) -> None:
    spec = {"method": "prune", "input_shape": [1, 3, 8, 8], "prune": {"finetune": {"epochs": 1}}}
    body = _problem(api.submit(model_bytes, spec), 422)
    assert body["errors"] == {"spec.prune.finetune": ["needs a data file (multipart part 'data') to train on"]}


def test_qat_without_data_and_qat_options_in_another_mode(api: ApiClient, model_bytes: bytes) -> None:
    spec = {"method": "quantize", "input_shape": [1, 3, 8, 8], "quantize": {"mode": "qat"}}
    body = _problem(api.submit(model_bytes, spec), 422)
    assert (
        list(body["errors"]) == ["spec.quantize.mode"]
        and "needs a data file" in body["errors"]["spec.quantize.mode"][0]
    )
    spec = {"method": "quantize", "input_shape": [1, 3, 8, 8], "quantize": {"mode": "static", "qat": {"epochs": 2}}}
    assert _problem(api.submit(model_bytes, spec), 422)["errors"] == {
        "spec.quantize.qat": ["only used when mode is 'qat'"]
    }
    spec = {"method": "quantize", "input_shape": [1, 3, 8, 8], "quantize": {"mode": "qat", "qat": {"epochs": 0}}}
    assert list(_problem(api.submit(model_bytes, spec), 422)["errors"]) == ["spec.quantize.qat.epochs"]


PRUNE_SHAPE = {"method": "prune", "input_shape": [1, 3, 8, 8]}


@pytest.mark.parametrize(
    ("prune", "field"),
    [
        ({"importance": "bn_scale"}, "spec.prune.importance"),  # structured: false
        ({"importance": "group_lasso", "structured": False}, "spec.prune.importance"),
        ({"regularize": {"epochs": 1}}, "spec.prune.regularize"),  # unstructured
        ({"structured": True, "regularize": {"epochs": 1}}, "spec.prune.regularize"),  # importance l1
        ({"importance": "l1", "criterion": "l2"}, "spec.prune.importance"),
        (
            {"importance": "bn_scale", "structured": True, "regularize": {"strength": 0}},
            "spec.prune.regularize.strength",
        ),
        ({"importance": "entropy"}, "spec.prune.importance"),
        ({"schedule": {"steps": 3}}, "spec.prune.schedule"),  # without finetune
        ({"schedule": {"steps": 4}, "finetune": {"epochs": 3}}, "spec.prune.schedule.steps"),
        ({"schedule": {"steps": 1}, "finetune": {}}, "spec.prune.schedule.steps"),
        ({"schedule": {"curve": "exponential"}, "finetune": {}}, "spec.prune.schedule.curve"),
        ({"hidden": True}, "spec.prune.hidden"),  # unstructured: no width to remove
        ({"hidden": "sometimes", "structured": True}, "spec.prune.hidden"),
    ],
)
def test_prune_training_options_that_do_not_fit_are_named(
    api: ApiClient, model_bytes: bytes, prune: dict, field: str
) -> None:
    body = _problem(api.submit(model_bytes, {**PRUNE_SHAPE, "prune": prune}), 422)
    assert list(body["errors"]) == [field]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**PRUNE_SHAPE, "prune": {"importance": "bn_scale", "structured": True}}, "spec.prune.importance"),
        (
            {**PRUNE_SHAPE, "prune": {"importance": "group_lasso", "structured": True, "regularize": {"epochs": 1}}},
            "spec.prune.importance",
        ),
        (
            {
                "method": "pipeline",
                "input_shape": [1, 3, 8, 8],
                "steps": [{"method": "prune", "prune": {"importance": "group_lasso", "structured": True}}],
            },
            "spec.steps.0.prune.importance",
        ),
    ],
)
def test_sparsity_training_without_data(api: ApiClient, model_bytes: bytes, spec: dict, field: str) -> None:
    body = _problem(api.submit(model_bytes, spec), 422)
    assert list(body["errors"]) == [field] and "needs a data file" in body["errors"][field][0]


def test_prune_training_options_get_their_defaults_and_old_specs_keep_working() -> None:
    parsed = parse_spec({**PRUNE_SHAPE, "prune": {"importance": "bn_scale", "structured": True}}, has_data=True)
    assert parsed["prune"]["regularize"] == {"strength": 0.01, "epochs": 3, "lr": 0.01}
    assert parsed["prune"]["schedule"] is None and parsed["prune"]["criterion"] == "l1"
    old = parse_spec({**PRUNE_SHAPE, "prune": {"criterion": "l2", "structured": True}})
    assert (old["prune"]["importance"], old["prune"]["criterion"], old["prune"]["regularize"]) == ("l2", "l2", None)
    new = parse_spec({**PRUNE_SHAPE, "prune": {"importance": "l2"}})
    assert new["prune"]["criterion"] == "l2"
    scheduled = parse_spec({**PRUNE_SHAPE, "prune": {"schedule": {}, "finetune": {}}}, has_data=True)
    assert scheduled["prune"]["schedule"] == {"steps": 3, "curve": "cubic"}
    for spec in (parsed, old, new, scheduled):  # what the job resource shows is accepted again as it is
        assert parse_spec(dump_spec(spec), has_data=True) == spec


def test_section_for_another_method(api: ApiClient, model_bytes: bytes) -> None:
    spec = {"method": "quantize", "input_shape": [1, 3, 8, 8], "prune": {"amount": 0.5}}
    body = _problem(api.submit(model_bytes, spec), 422)
    assert body["errors"] == {"spec.prune": ["only allowed when method is 'prune'"]}


def test_distill_without_data(api: ApiClient, model_bytes: bytes) -> None:
    spec = {"method": "distill", "distill": {"student": {"from": "width", "width": 0.5}}}
    body = _problem(api.submit(model_bytes, spec), 422)
    assert list(body["errors"]) == ["data"]


def test_distill_upload_without_student_part(api: ApiClient, model_bytes: bytes, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 3, 8, 8), dtype=np.float32))
    spec = {"method": "distill", "distill": {"student": {"from": "upload"}}}
    body = _problem(api.submit(model_bytes, spec, data=tmp_path / "d.npz"), 422)
    assert "required" in body["errors"]["student"][0]


def test_student_part_that_is_not_torchscript(api: ApiClient, model_bytes: bytes, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 3, 8, 8), dtype=np.float32))
    (tmp_path / "student.pt").write_bytes(b"not a model at all")
    spec = {"method": "distill", "distill": {"student": {"from": "upload"}}}
    body = _problem(api.submit(model_bytes, spec, data=tmp_path / "d.npz", student=tmp_path / "student.pt"), 422)
    assert "not a TorchScript archive" in body["errors"]["student"][0]


def test_width_student_needs_its_width(api: ApiClient, model_bytes: bytes, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 3, 8, 8), dtype=np.float32))
    spec = {"method": "distill", "distill": {"student": {"from": "width"}}}
    body = _problem(api.submit(model_bytes, spec, data=tmp_path / "d.npz"), 422)
    assert body["errors"] == {"spec.distill.student.width": ["required when from is 'width'"]}


WIDTH = {"from": "width", "width": 0.5}


@pytest.mark.parametrize(
    ("distill", "field", "message"),
    [
        (
            {"student": {"from": "upload"}, "schedule": {"steps": 2}},
            "spec.distill.schedule",
            "only for a width student (student.from 'width')",
        ),
        (
            {"student": WIDTH, "epochs": 2, "schedule": {"steps": 3}},
            "spec.distill.schedule.steps",
            "at most epochs (2)",
        ),
        ({"student": WIDTH, "schedule": {"steps": 1}}, "spec.distill.schedule.steps", "greater than or equal to 2"),
        (
            {"student": {"from": "torchvision", "arch": "resnet18"}, "features": {}},
            "spec.distill.features.pairs",
            "required when student.from is 'torchvision'",
        ),
        (
            {"student": WIDTH, "features": {"pairs": [["layer1"]]}},
            "spec.distill.features.pairs.0",
            "a pair: [student layer, teacher layer]",
        ),
        (
            {"student": WIDTH, "features": {"pairs": [["layer 1", "layer1"]]}},
            "spec.distill.features.pairs.0.0",
            "a module's qualified name",
        ),
        (
            {"student": WIDTH, "features": {"pairs": [["fc", "fc"], ["fc", "fc"]]}},
            "spec.distill.features.pairs",
            "each pair at most once",
        ),
        ({"student": WIDTH, "features": True}, "spec.distill.features", "Invalid input type"),
        ({"student": WIDTH, "features": {"weight": 0}}, "spec.distill.features.weight", "greater than 0"),
        ({"student": WIDTH, "features": {"layers": ["conv"]}}, "spec.distill.features.layers", "Unknown field"),
    ],
)
def test_distill_features_and_schedule_that_do_not_fit_are_named(
    api: ApiClient, model_bytes: bytes, tmp_path: Path, distill: dict, field: str, message: str
) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 3, 8, 8), dtype=np.float32))
    body = _problem(api.submit(model_bytes, {"method": "distill", "distill": distill}, data=tmp_path / "d.npz"), 422)
    assert list(body["errors"]) == [field] and message in body["errors"][field][0], body["errors"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"method": "quantize", "inputs": [{"shape": [2, 5], "dtype": "int8"}]}, "spec.inputs.0.dtype"),
        (
            {"method": "quantize", "inputs": [{"shape": [2, 5]}, {"shape": [2, 5], "dtype": "bool", "low": 0}]},
            "spec.inputs.1.low",
        ),
        (
            {"method": "quantize", "inputs": [{"shape": [2, 5], "dtype": "int64", "low": 9, "high": 3}]},
            "spec.inputs.0.high",
        ),
        ({"method": "quantize", "inputs": [{"shape": [2, 5]}, {"shape": [3, 5]}]}, "spec.inputs"),
        ({"method": "quantize", "inputs": [{"shape": [2, 5]}], "input_shape": [2, 5]}, "spec.inputs"),
        ({**GOOD_SPEC, "output": -1}, "spec.output"),
    ],
)
def test_bad_inputs_and_output_are_named(api: ApiClient, model_bytes: bytes, spec: dict, field: str) -> None:
    body = _problem(api.submit(model_bytes, spec), 422)
    assert list(body["errors"]) == [field]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**GOOD_SPEC, "package": "aoti"}, "spec.package"),
        ({**GOOD_SPEC, "evaluation": {"runtime": "compile"}}, "spec.evaluation.runtime"),
    ],
)
def test_program_only_options_on_a_torchscript_model_are_named(
    api: ApiClient, model_bytes: bytes, spec: dict, field: str
) -> None:
    body = _problem(api.submit(model_bytes, spec), 422)
    assert list(body["errors"]) == [field] and ".pt2" in body["errors"][field][0]


def test_data_file_that_contradicts_the_declared_inputs_is_refused_at_submit(
    api: ApiClient, model_bytes: bytes, tmp_path: Path
) -> None:
    np.savez(
        tmp_path / "two.npz",
        input_0=np.zeros((4, 3, 8, 8), dtype=np.float32),
        input_1=np.zeros((4, 16), dtype=np.int64),
    )
    before = len(api.session.get(api.url("/v1/jobs?limit=100")).json()["jobs"])
    declared = {"method": "quantize", "inputs": [{"shape": [2, 3, 8, 8]}, {"shape": [2, 12], "dtype": "int32"}]}

    body = _problem(api.submit(model_bytes, declared, data=tmp_path / "two.npz"), 422)
    assert body["errors"] == {
        "spec.inputs.1.shape": [
            "samples of shape [12] declared, but the data file's 'input_1' has samples of shape "
            "[16] (array shape [4, 16]); only the batch axis may differ"
        ],
        "spec.inputs.1.dtype": ["int32 declared, but the data file's 'input_1' holds int64"],
    }
    body = _problem(api.submit(model_bytes, GOOD_SPEC, data=tmp_path / "two.npz"), 422)
    assert body["errors"] == {"spec.input_shape": ["declares 1 input(s) but the data file has 2 (input_0, input_1)"]}
    assert len(api.session.get(api.url("/v1/jobs?limit=100")).json()["jobs"]) == before  # nothing was queued
