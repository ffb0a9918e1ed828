"""Per-job wall clock, per-tenant running cap and the process-log cap, through the real API and worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.stack import Stack
from tests.conftest import ApiClient, make_settings, write_keys
from tests.models import SmallConvNet, save_scripted
from workers import process_log

OPERATOR_LIMIT_S = 120
TIME_LIMIT_S = 8  # a spec's own limit: the endless jobs end here, well before the operator's
QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}


class Endless(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while bool(x.sum() > -1e30):  # data-dependent, so TorchScript cannot fold it away
            x = x * 1.0
        return x


class Chatty(nn.Module):
    """Prints 8 MB on every forward pass (TorchScript's print needs no file access)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.line = "spam " * 200

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(8000):
            print(self.line)
        return self.fc(x)


@dataclass
class Limited:
    stack: Stack
    alpha: ApiClient
    beta: ApiClient


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    root = tmp_path_factory.mktemp("job-limits")
    keys = {"alpha": "mp_alpha-limits-key", "beta": "mp_beta-limits-key"}
    write_keys(root / "keys", keys)
    settings = make_settings(
        root / "data",
        redis_url=None,
        api_keys_file=root / "keys",
        worker_concurrency=2,
        max_running_jobs=1,
        job_threads=1,
        job_timeout_s=OPERATOR_LIMIT_S,
        job_memory_mb=2048,
    )
    stack = Stack(settings, log_dir=root / "logs")
    try:
        stack.start()
        clients = {}
        for tenant, key in keys.items():
            clients[tenant] = ApiClient(stack.base_url)
            clients[tenant].session.headers["Authorization"] = f"Bearer {key}"
        yield Limited(stack, clients["alpha"], clients["beta"])
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("limit-models")
    torch.manual_seed(0)
    return {
        "quick": save_scripted(SmallConvNet(), root / "quick.pt"),
        "endless": save_scripted(Endless(), root / "endless.pt"),
        "chatty": save_scripted(Chatty(), root / "chatty.pt"),
    }


@pytest.mark.parametrize(
    "asked, wrong",
    [
        (OPERATOR_LIMIT_S + 1, f"at most {OPERATOR_LIMIT_S}"),
        (0, "greater than or equal to 1"),
        (2.5, "Not a valid integer"),
    ],
)
def test_spec_time_limit_outside_the_operators_is_refused(
    limited: Limited, models: dict[str, Path], asked: float, wrong: str
) -> None:
    response = limited.alpha.submit(models["quick"], {**QUICK, "time_limit_s": asked})
    assert response.status_code == 422
    assert wrong in " ".join(response.json()["errors"]["spec.time_limit_s"])


def test_endless_loops_end_at_their_limit_while_another_tenants_job_runs(
    limited: Limited, models: dict[str, Path]
) -> None:
    endless = {**QUICK, "input_shape": [1, 4], "time_limit_s": TIME_LIMIT_S}
    looping = [limited.alpha.submit(models["endless"], endless).json()["id"] for _ in range(2)]
    other = limited.beta.submit(models["quick"], {**QUICK, "time_limit_s": OPERATOR_LIMIT_S})
    assert other.status_code == 202  # the positive control of the spec field: a limit within the operator's

    done = limited.beta.wait(other.json()["id"], timeout=300)
    assert done["state"] == "succeeded"
    first, second = sorted(
        (limited.alpha.wait(job_id, timeout=300) for job_id in looping), key=lambda job: job["started_at"]
    )
    for job in (first, second):  # the fault struck: each loop ran until stopped
        assert job["state"] == "failed"
        assert job["error"]["type"].endswith("/job-timeout")
        assert f"time limit of {TIME_LIMIT_S} s" in job["error"]["detail"]
    # Two worker slots, alpha capped at one running job: beta's job started while alpha's first ran,
    # and alpha's second waited queued until its first had ended.
    assert done["started_at"] < first["finished_at"]
    assert second["started_at"] >= first["finished_at"]
    assert second["deliveries"] == 1  # put back while alpha was at its cap, never counted as a delivery


def test_print_flood_leaves_only_the_tail_of_the_process_log(limited: Limited, models: dict[str, Path]) -> None:
    job = limited.alpha.wait(
        limited.alpha.submit(models["chatty"], {**QUICK, "input_shape": [1, 8]}).json()["id"], timeout=300
    )
    assert job["state"] == "succeeded", job["error"]
    log = limited.stack.settings.data_dir / "jobs" / job["id"] / "process.log"
    first_line = log.read_text().splitlines()[0]
    dropped = int(first_line.split()[1])
    assert dropped > 20 << 20  # the fault struck: the model printed tens of MB
    assert first_line.startswith("[modelpress:") and "earlier output dropped" in first_line
    assert log.stat().st_size <= process_log.MAX_BYTES + len(first_line) + 1
    assert log.read_text().splitlines()[-1] == "spam " * 200  # the tail is what the model printed last
