"""The job memory limit counts resident memory: a job that grows past it is stopped with a clear reason."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from modelpress.stack import Stack
from tests.conftest import ApiClient, compression_process, make_settings
from tests.models import SmallConvNet, save_scripted

JOB_MEMORY_MB = 1536  # resident memory of a job; an idle job process with torch holds about 550 MB
QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}


class Hoarder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hoard: list[torch.Tensor] = []
        for step in range(128):  # 32 MB at a time, written (so resident), up to 4 GB: far above the limit
            # The value depends on the loop, else TorchScript folds the call into one constant tensor.
            hoard.append(torch.full([8_000_000], float(step)))
        for kept in hoard:  # every chunk is read at the end, so none can be freed early
            x = x + kept[0]
        return x


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    root = tmp_path_factory.mktemp("memory-limit")
    stack = Stack(
        make_settings(root / "data", redis_url=None, job_memory_mb=JOB_MEMORY_MB, job_threads=1), log_dir=root / "logs"
    )
    try:
        stack.start()
        yield ApiClient(stack.base_url)
    finally:
        stack.stop()


def test_job_growing_past_the_resident_limit_fails_out_of_memory_and_the_next_job_runs(
    limited: ApiClient, tmp_path: Path
) -> None:
    job_id = limited.submit(save_scripted(Hoarder(), tmp_path / "hoarder.pt"), QUICK).json()["id"]
    child = compression_process(job_id, timeout=120)
    assert limited.job(job_id)["state"] == "running"
    seen_mb = 0
    while True:  # sample the job process's resident memory until the limit strikes
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                break
            seen_mb = max(seen_mb, child.memory_info().rss >> 20)
        except psutil.Error:
            break
        time.sleep(0.01)
    # The fault struck where intended: the running job really held memory, well past an idle job's ~600 MB.
    assert seen_mb > 900

    job = limited.wait(job_id, timeout=120)
    assert job["state"] == "failed"
    assert job["error"]["title"] == "Out of memory"
    assert f"limit of {JOB_MEMORY_MB} MB" in job["error"]["detail"]
    reached = int(re.search(r"reached (\d+) MB resident", job["error"]["detail"]).group(1))
    assert reached > JOB_MEMORY_MB  # stopped by the resident-memory watch, not by an allocation failure

    follower = limited.wait(
        limited.submit(save_scripted(SmallConvNet(), tmp_path / "quick.pt"), QUICK).json()["id"], timeout=300
    )
    assert follower["state"] == "succeeded"
    report = limited.session.get(limited.url(follower["links"]["report"])).json()
    assert 0 < report["resources"]["peak_resident_mb"] < JOB_MEMORY_MB
    assert report["sandbox"]["limits"]["resident_mb"] == JOB_MEMORY_MB
    assert set(report["timings_s"]) == {"load", "measure", "transform", "save", "startup"}
