"""Load on the hardened stack: fifty jobs from ten threads, in a file of its own so that it runs beside the
other hardening tests (`make test` runs a file per test process) on a stack of its own."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tests.e2e import test_hardening
from tests.e2e.test_hardening import QUICK, Hardened
from tests.models import SmallConvNet, save_scripted

hardened = test_hardening.hardened  # the same stack's settings, started for this file alone (module scope)


def test_fifty_jobs_from_ten_threads(hardened: Hardened, tmp_path: Path) -> None:
    torch.manual_seed(1)
    original = SmallConvNet().eval()
    model = save_scripted(original, tmp_path / "conv.pt")
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: hardened.alpha.submit(model, QUICK), range(50)))
    assert [r.status_code for r in responses] == [202] * 50
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 50

    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = original(x)
    for job_id in ids:
        job = hardened.alpha.wait(job_id, timeout=600)
        assert job["state"] == "succeeded", job["error"]
        body = hardened.alpha.session.get(hardened.alpha.url(job["links"]["model"])).content
        with torch.no_grad():
            assert torch.allclose(torch.jit.load(io.BytesIO(body))(x), expected)
