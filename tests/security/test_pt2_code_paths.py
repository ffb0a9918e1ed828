""".pt2 programs carrying code, through the real service: refused with 422 at submit, and, planted past the
submit check (a stack with ``MODELPRESS_OP_CHECK=job`` and no sandbox, so that only the job's own check
stands between the payload and the host), a failed job whose payload never ran; the same genuine program
succeeds on both stacks."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.stack import Stack
from tests.conftest import ApiClient, make_settings
from tests.exported_archives import (
    save_exported,
    with_graph_target,
    with_guards_code,
    with_higher_order_call,
    with_renamed_input,
)

SPEC = {"method": "quantize", "input_shape": [4, 16], "evaluation": {"runs": 1, "warmup": 0}}


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    return save_exported(model, torch.randn(4, 16), tmp_path_factory.mktemp("pt2-models") / "genuine.pt2")


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    """No submit-time operator policy, no sandbox: the job's check of the program is the only layer."""
    root = tmp_path_factory.mktemp("pt2-unguarded")
    stack = Stack(
        make_settings(root / "data", redis_url=None, op_check="job", sandbox="off", job_timeout_s=120),
        log_dir=root / "logs",
    )
    try:
        stack.start()
        yield ApiClient(stack.base_url)
    finally:
        stack.stop()


PAYLOADS = {
    "guards_code": (
        lambda genuine, marker: with_guards_code(genuine, [f"__import__('os').system('touch {marker}') == 0"]),
        "guard code",
    ),
    "higher_order_callable": (
        lambda genuine, marker: with_higher_order_call(genuine, "torch.ops.aten.from_file.default", marker),
        "from_file|higher-order",
    ),
    "value_name": (
        lambda genuine, marker: with_renamed_input(genuine, f"x=__import__('os').system('touch {marker}')"),
        "not a Python identifier",
    ),
    "extension_operator": (lambda genuine, marker: with_graph_target(genuine, "#mylib:run"), "not a torch operator"),
}


def _job_ids(client: ApiClient) -> list[str]:
    return [job["id"] for job in client.session.get(client.url("/v1/jobs?limit=100")).json()["jobs"]]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_program_carrying_code_is_refused_at_submit(
    payload: str, api: ApiClient, genuine: Path, tmp_path: Path
) -> None:
    build, reason = PAYLOADS[payload]
    marker = tmp_path / "payload-ran"
    before = _job_ids(api)

    response = api.submit(build(genuine, marker), SPEC, filename="innocent.pt2")

    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    errors = response.json()["errors"]
    assert list(errors) == ["model"]
    assert re.search(reason, " ".join(errors["model"])), errors
    assert _job_ids(api) == before  # nothing was queued
    assert not marker.exists()


def test_the_genuine_program_is_accepted_and_compressed(api: ApiClient, genuine: Path) -> None:
    response = api.submit(genuine, SPEC, filename="genuine.pt2")
    assert response.status_code == 202, response.text
    job = api.wait(response.json()["id"], timeout=300)
    assert job["state"] == "succeeded", job["error"]


def test_a_callable_planted_past_the_submit_check_fails_the_job_and_never_runs(
    unguarded: ApiClient, genuine: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "payload-ran"  # reachable from the job: this stack runs jobs without the sandbox
    response = unguarded.submit(
        with_higher_order_call(genuine, "torch.ops.aten.from_file.default", marker), SPEC, filename="innocent.pt2"
    )
    assert response.status_code == 202, response.text  # the operator policy is the job's here

    job = unguarded.wait(response.json()["id"], timeout=300)

    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("invalid-model"), job["error"]
    assert "from_file" in job["error"]["detail"] or "higher-order op 'wrap'" in job["error"]["detail"], job["error"]
    assert not marker.exists()


def test_the_genuine_program_succeeds_where_only_the_job_checks(unguarded: ApiClient, genuine: Path) -> None:
    response = unguarded.submit(genuine, SPEC, filename="genuine.pt2")
    assert response.status_code == 202, response.text
    job = unguarded.wait(response.json()["id"], timeout=300)
    assert job["state"] == "succeeded", job["error"]
