"""Job records outlive restarts of the API, the worker and Redis (append-only file on)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelpress.stack import Stack
from tests.conftest import ApiClient, make_settings
from tests.models import SmallConvNet, save_scripted

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 2, "warmup": 0}}


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("restarts")
    running = Stack(make_settings(root / "data", redis_url=None), log_dir=root / "logs")
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_jobs_survive_restarts_of_every_part(own_stack: Stack, tmp_path: Path) -> None:
    api = ApiClient(own_stack.base_url)
    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    first = api.wait(api.submit(model, SPEC).json()["id"], timeout=120)
    assert first["state"] == "succeeded"

    own_stack.stop_process("api")
    own_stack.start_api()
    assert api.job(first["id"]) == first

    own_stack.stop_process("worker")
    own_stack.start_worker()
    own_stack.stop_process("redis")
    own_stack.start_redis()
    assert api.job(first["id"]) == first
    assert api.session.get(api.url(first["links"]["model"])).status_code == 200

    # The worker and the API reconnect by themselves and take new jobs.
    second = api.wait(api.submit(model, SPEC).json()["id"], timeout=180)
    assert second["state"] == "succeeded", second["error"]
    listed = [job["id"] for job in api.session.get(api.url("/v1/jobs")).json()["jobs"]]
    assert listed == [second["id"], first["id"]]
