"""Finished jobs are removed with their files after the retention period; DELETE removes them at once."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ApiClient
from tests.models import SmallConvNet, save_scripted
from workers.celery_app import make_celery
from workers.reaper import Reaper

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}


def test_retention_sweep_removes_expired_jobs_and_their_files(api: ApiClient, stack, tmp_path: Path) -> None:
    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    job = api.wait(api.submit(model, SPEC).json()["id"], timeout=120)
    assert job["state"] == "succeeded"
    job_dir = stack.settings.data_dir / "jobs" / job["id"]
    assert (job_dir / "output" / "model.pt").exists()

    keeping = Reaper(stack.settings, make_celery(stack.settings))  # a week: nothing this young goes
    assert job["id"] not in keeping.sweep()[1]
    assert api.job(job["id"])["state"] == "succeeded"

    expiring = stack.settings.with_changes(retention_hours=1e-9)
    _, expired = Reaper(expiring, make_celery(expiring)).sweep()

    assert job["id"] in expired
    assert api.session.get(api.url(f"/v1/jobs/{job['id']}")).status_code == 404
    assert not job_dir.exists()
