"""Job resources, listing, OpenAPI and health, against the running service."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ApiClient
from tests.models import SmallConvNet, scripted_bytes

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 2, "warmup": 0}}


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    torch.manual_seed(0)
    return scripted_bytes(SmallConvNet())


def test_submit_answers_202_with_location_and_filled_defaults(api: ApiClient, model_bytes: bytes) -> None:
    response = api.submit(model_bytes, SPEC, filename="conv.pt")

    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["state"] == "queued" and job["progress"] == 0.0
    assert job["spec"]["quantize"] == {
        "mode": "dynamic",
        "dtype": "qint8",
        "modules": ["Linear", "LSTM", "GRU", "MultiheadAttention", "Embedding", "EmbeddingBag"],
        "exclude": [],
        "per_channel": True,
    }
    assert job["input"]["filename"] == "conv.pt" and job["input"]["bytes"] == len(model_bytes)
    import hashlib

    assert job["input"]["sha256"] == hashlib.sha256(model_bytes).hexdigest()


def test_model_and_report_are_409_until_success(api: ApiClient, model_bytes: bytes) -> None:
    job = api.submit(model_bytes, SPEC).json()
    early = api.session.get(api.url(f"/v1/jobs/{job['id']}/model"))
    if api.job(job["id"])["state"] != "succeeded":  # it may already be done on a fast worker
        assert early.status_code == 409
        assert early.headers["Content-Type"] == "application/problem+json"
    done = api.wait(job["id"])
    assert done["state"] == "succeeded"
    assert api.session.get(api.url(done["links"]["report"])).status_code == 200


def test_list_is_newest_first_with_cursor_pages_and_state_filter(api: ApiClient, model_bytes: bytes) -> None:
    ids = [api.submit(model_bytes, SPEC).json()["id"] for _ in range(3)]
    for job_id in ids:
        api.wait(job_id)

    first = api.session.get(api.url("/v1/jobs?limit=2")).json()
    assert [j["id"] for j in first["jobs"]] == ids[::-1][:2]
    second = api.session.get(api.url(f"/v1/jobs?limit=2&cursor={first['next_cursor']}")).json()
    assert second["jobs"][0]["id"] == ids[0]
    succeeded = api.session.get(api.url("/v1/jobs?state=succeeded&limit=100")).json()["jobs"]
    assert set(ids) <= {j["id"] for j in succeeded}
    assert all(j["state"] == "succeeded" for j in succeeded)
    cancelled = api.session.get(api.url("/v1/jobs?state=cancelled&limit=100")).json()["jobs"]
    assert not set(ids) & {j["id"] for j in cancelled}


def test_cancel_queued_or_running_then_delete(api: ApiClient, model_bytes: bytes) -> None:
    job = api.submit(model_bytes, SPEC).json()
    answer = api.session.delete(api.url(f"/v1/jobs/{job['id']}"))
    if answer.status_code == 202:
        state = api.wait(job["id"])["state"]
        assert state in ("cancelled", "succeeded")  # a tiny job can finish before the cancel lands
    else:
        assert answer.status_code == 204
    finished = api.wait(job["id"]) if answer.status_code == 202 else None
    if finished is not None:
        assert api.session.delete(api.url(f"/v1/jobs/{job['id']}")).status_code == 204
    assert api.session.get(api.url(f"/v1/jobs/{job['id']}")).status_code == 404


def test_openapi_document_describes_the_api(api: ApiClient) -> None:
    document = api.session.get(api.url("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/model",
        "/v1/jobs/{job_id}/report",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["$ref"].endswith("JobSubmission")
    schemas = document["components"]["schemas"]
    assert set(schemas["JobSubmission"]["properties"]) == {"model", "spec", "data", "student", "callback_url"}
    assert schemas["QuantizeSpec"]["properties"]["dtype"]["enum"] == ["qint8", "float16"]
    assert "422" in paths["/v1/jobs"]["post"]["responses"]
    assert api.session.get(api.url("/docs")).status_code == 200


def test_health_and_readiness(api: ApiClient) -> None:
    assert api.session.get(api.url("/healthz")).json() == {"status": "ok"}
    ready = api.session.get(api.url("/readyz"))
    assert ready.status_code == 200 and ready.json()["workers"] >= 1
