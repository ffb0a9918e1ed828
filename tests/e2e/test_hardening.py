"""Untrusted uploads, tenants and faults, against a stack with API keys and tight limits."""

from __future__ import annotations

import io
import pickle
import struct
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from modelpress.stack import Stack
from tests import zip_bombs
from tests.conftest import ApiClient, compression_process, make_settings, write_keys
from tests.models import SlowModel, SmallConvNet, save_scripted, scripted_bytes

QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
SLOW = {"method": "quantize", "input_shape": [8, 64], "evaluation": {"runs": 1000, "warmup": 0}}
MEDIUM = {"method": "quantize", "input_shape": [8, 64], "evaluation": {"runs": 40, "warmup": 0}}
JOB_TIMEOUT_S = 40  # a quick job takes seconds alone; 40 s leaves room for a loaded machine
METRICS_TOKEN = "mp-metrics-scraper-token"


@dataclass
class Hardened:
    stack: Stack
    alpha: ApiClient
    beta: ApiClient
    anonymous: ApiClient


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hardened]:
    root = tmp_path_factory.mktemp("hardened")
    keys = {"alpha": "mp_alpha-secret-key", "beta": "mp_beta-secret-key"}
    write_keys(root / "keys", keys)
    settings = make_settings(
        root / "data",
        redis_url=None,
        api_keys_file=root / "keys",
        job_timeout_s=JOB_TIMEOUT_S,
        job_memory_mb=6144,
        max_active_jobs=60,
        worker_concurrency=2,
        job_threads=1,
        metrics_token=METRICS_TOKEN,
        op_check="job",
    )  # the in-job graph walk alone
    stack = Stack(settings, log_dir=root / "logs")
    try:
        stack.start()
        clients = {}
        for tenant, key in keys.items():
            clients[tenant] = ApiClient(stack.base_url)
            clients[tenant].session.headers["Authorization"] = f"Bearer {key}"
        yield Hardened(stack, clients["alpha"], clients["beta"], ApiClient(stack.base_url))
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardened-models")
    torch.manual_seed(0)
    return {
        "quick": save_scripted(SmallConvNet(), root / "quick.pt"),
        # About 0.5 s a pass, 1000 passes: never done inside JOB_TIMEOUT_S, however fast the machine or
        # however quickly its sandbox starts (5000 steps finished in 40 s once warm sandboxes came).
        "slow": save_scripted(SlowModel(steps=50000), root / "slow.pt"),
        "medium": save_scripted(SlowModel(steps=1500), root / "medium.pt"),
    }


# ----------------------------------------------------------------------------- keys and tenants


def test_every_v1_route_needs_a_valid_key(hardened: Hardened) -> None:
    for client, header in (
        (hardened.anonymous, None),
        (hardened.anonymous, "Bearer mp_wrong"),
        (hardened.anonymous, "Basic x"),
    ):
        headers = {"Authorization": header} if header else {}
        for method, path in (
            ("GET", "/v1/jobs"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
            ("DELETE", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        ):
            response = client.session.request(method, client.url(path), headers=headers)
            assert response.status_code == 401, (method, path, header)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.headers["Content-Type"] == "application/problem+json"
    assert hardened.anonymous.session.get(hardened.anonymous.url("/healthz")).status_code == 200


def test_a_tenant_cannot_see_another_tenants_job(hardened: Hardened, models: dict[str, Path]) -> None:
    job = hardened.alpha.wait(hardened.alpha.submit(models["quick"], QUICK).json()["id"], timeout=120)
    assert job["state"] == "succeeded"
    beta = hardened.beta
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/model"),
        ("GET", f"/v1/jobs/{job['id']}/report"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
    ):
        response = beta.session.request(method, beta.url(path))
        assert response.status_code == 404, (method, path)
        assert "no job" in response.json()["detail"]
    assert job["id"] not in {j["id"] for j in beta.session.get(beta.url("/v1/jobs?limit=100")).json()["jobs"]}
    assert hardened.alpha.job(job["id"])["state"] == "succeeded"  # the refused DELETE changed nothing


def test_metrics_and_readiness_details_need_a_key_or_the_metrics_token(hardened: Hardened) -> None:
    session = hardened.anonymous.session
    metrics, ready = hardened.anonymous.url("/metrics"), hardened.anonymous.url("/readyz")

    assert session.get(metrics).status_code == 401
    assert session.get(metrics, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "modelpress_jobs" in session.get(metrics, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert hardened.alpha.session.get(metrics).status_code == 200
    assert session.get(ready).json() == {"status": "ready"}  # whether, not why: no workers, no sandbox details
    detailed = session.get(ready, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).json()
    assert detailed["workers"] >= 1 and set(detailed["sandbox"].values()) == {"confined"}
    assert session.get(hardened.anonymous.url("/healthz")).status_code == 200


def test_gzip_refused_with_q_0_is_not_sent(hardened: Hardened, models: dict[str, Path]) -> None:
    job = hardened.alpha.wait(hardened.alpha.submit(models["quick"], QUICK).json()["id"], timeout=120)
    url = hardened.alpha.url(job["links"]["model"])

    refused = hardened.alpha.session.get(url, headers={"Accept-Encoding": "gzip;q=0"})
    wanted = hardened.alpha.session.get(url, headers={"Accept-Encoding": "gzip"}, stream=True)

    assert "Content-Encoding" not in refused.headers
    assert torch.jit.load(io.BytesIO(refused.content)) is not None
    assert wanted.headers["Content-Encoding"] == "gzip"


# ----------------------------------------------------------------------------- untrusted files


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_write_a_file_is_refused_unread(hardened: Hardened, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    response = hardened.alpha.submit(pickle.dumps(_Marker(str(marker))), QUICK)
    assert response.status_code == 422
    assert "torch.jit.script" in response.json()["errors"]["model"][0]
    assert not marker.exists()


def test_torchscript_archive_with_a_malicious_data_pickle_fails_its_job_only(
    hardened: Hardened, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned-too"
    genuine = zipfile.ZipFile(io.BytesIO(scripted_bytes(SmallConvNet())))
    forged = io.BytesIO()
    with zipfile.ZipFile(forged, "w") as archive:
        for entry in genuine.infolist():
            body = pickle.dumps(_Marker(str(marker))) if entry.filename.endswith("/data.pkl") else genuine.read(entry)
            archive.writestr(entry.filename, body)
    job = hardened.alpha.wait(hardened.alpha.submit(forged.getvalue(), QUICK).json()["id"], timeout=120)

    assert job["state"] == "failed"
    assert job["error"]["title"] == "Invalid model"
    assert not marker.exists()


def test_zip_bomb_is_refused_without_the_api_growing(hardened: Hardened, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt"
    small = [zip_bombs.stored(name, b"x") for name in ("m/data.pkl", "m/constants.pkl", "m/version", "m/code/m.py")]
    bomb.write_bytes(zip_bombs.archive(*small, zip_bombs.zeros_deflated("m/data/0", 2048)))  # 2 GB of zeros
    assert bomb.stat().st_size < 10 << 20
    api_process = psutil.Process(hardened.stack.processes["api"].pid)

    def api_memory() -> int:
        return sum(p.memory_info().rss for p in [api_process, *api_process.children(recursive=True)])

    before = api_memory()
    response = hardened.alpha.submit(bomb, QUICK)
    assert response.status_code == 422
    assert "zip bomb" in response.json()["errors"]["model"][0]
    assert api_memory() - before < 50 << 20


class _ReadsAFile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_file("/etc/hostname", False, 1, dtype=torch.uint8).float().sum()


def test_the_job_refuses_a_file_operator_before_forward_runs(hardened: Hardened, tmp_path: Path) -> None:
    """This stack skips the submit-time scan (MODELPRESS_OP_CHECK=job): the job's graph walk must catch it."""
    response = hardened.alpha.submit(save_scripted(_ReadsAFile(), tmp_path / "reader.pt"), QUICK)
    assert response.status_code == 202

    job = hardened.alpha.wait(response.json()["id"], timeout=120)

    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/unsafe-model")
    assert "forward calls aten::from_file" in job["error"]["detail"]


def test_zip_that_lies_about_its_entry_count_is_refused_without_the_api_growing(
    hardened: Hardened, tmp_path: Path
) -> None:
    liar = tmp_path / "liar.pt"
    liar.write_bytes(
        zip_bombs.many_empty_entries(["m/data.pkl", "m/constants.pkl", "m/version", "m/code/m.py"], 200_000, "m/data/")
    )
    body = bytearray(liar.read_bytes())
    end = body.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", body, end + 8, 3, 3)  # the end record now says 3 entries
    assert len(zipfile.ZipFile(io.BytesIO(bytes(body))).infolist()) == 200_004  # zipfile parses them all anyway
    api_process = psutil.Process(hardened.stack.processes["api"].pid)

    def api_memory() -> int:
        return sum(p.memory_info().rss for p in [api_process, *api_process.children(recursive=True)])

    before = api_memory()
    response = hardened.alpha.submit(bytes(body), QUICK)
    assert response.status_code == 422
    assert "directory declares" in response.json()["errors"]["model"][0]
    assert api_memory() - before < 60 << 20


def test_model_that_allocates_beyond_the_limit_fails_and_the_worker_goes_on(
    hardened: Hardened, tmp_path: Path, models: dict[str, Path]
) -> None:
    class Greedy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # 16 GB of float32 at once: the address-space backstop (2 x 6 GB + 4 GB) fails the allocation itself,
            # before the resident-memory watch could see it grow (tests/e2e/test_memory_limit.py covers that).
            hoard = torch.ones(4_000_000_000)
            return x + hoard[0]

    job = hardened.alpha.wait(
        hardened.alpha.submit(save_scripted(Greedy(), tmp_path / "greedy.pt"), QUICK).json()["id"], timeout=120
    )
    assert job["state"] == "failed"
    assert job["error"]["title"] == "Out of memory"
    assert "6144 MB" in job["error"]["detail"]
    follower = hardened.alpha.wait(hardened.alpha.submit(models["quick"], QUICK).json()["id"], timeout=120)
    assert follower["state"] == "succeeded"


def test_job_process_runs_without_network_or_secrets(hardened: Hardened, models: dict[str, Path]) -> None:
    job = hardened.alpha.wait(hardened.alpha.submit(models["quick"], QUICK).json()["id"], timeout=120)
    sandbox = hardened.alpha.session.get(hardened.alpha.url(job["links"]["report"])).json()["sandbox"]

    assert sandbox["network"] == "isolated"
    assert not {"REDIS_URL", "MODELPRESS_API_KEYS_FILE", "HOME"} & set(sandbox["environment"])
    assert all(
        name.startswith(("MODELPRESS_", "OMP_", "MKL_", "OPENBLAS_", "TORCHINDUCTOR_COMPILE_THREADS"))
        or name in ("PATH", "PWD", "LANG", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE")
        for name in sandbox["environment"]
    )


# ----------------------------------------------------------------------------- limits


def test_hanging_compression_is_killed_at_the_time_limit(hardened: Hardened, models: dict[str, Path]) -> None:
    job_id = hardened.alpha.submit(models["slow"], SLOW).json()["id"]
    child = compression_process(job_id)

    job = hardened.alpha.wait(job_id, timeout=JOB_TIMEOUT_S + 60)
    assert job["state"] == "failed"
    assert job["error"]["title"] == "Time limit exceeded"
    assert f"{JOB_TIMEOUT_S} s" in job["error"]["detail"]
    child.wait(timeout=10)


def test_active_job_quota_answers_429(hardened: Hardened, models: dict[str, Path]) -> None:
    beta = hardened.beta
    accepted = []
    for _ in range(60):
        response = beta.submit(models["slow"], SLOW)
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])
    refused = beta.submit(models["quick"], QUICK)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "30"
    assert "MODELPRESS_MAX_ACTIVE_JOBS" in refused.json()["detail"]
    assert hardened.alpha.submit(models["quick"], QUICK).status_code == 202  # other tenants are not affected
    for job_id in accepted:
        assert beta.session.delete(beta.url(f"/v1/jobs/{job_id}")).status_code == 202
    for job_id in accepted:
        assert beta.wait(job_id, timeout=60)["state"] == "cancelled"


# ----------------------------------------------------------------------------- faults


def test_worker_killed_mid_job_and_started_again_finishes_the_job(hardened: Hardened, models: dict[str, Path]) -> None:
    job_id = hardened.alpha.submit(models["medium"], MEDIUM).json()["id"]
    child = compression_process(job_id)

    worker = hardened.stack.processes["worker"]
    hardened.stack.kill_process("worker")
    child.wait(timeout=30)  # the compression process dies with its supervisor
    assert worker.poll() is not None and not child.is_running()  # the fault struck: both are gone
    assert hardened.alpha.job(job_id)["state"] == "running"  # mid-job: it had not finished
    hardened.stack.start_worker()

    job = hardened.alpha.wait(job_id, timeout=180)
    assert job["state"] == "succeeded", job["error"]
    assert job["deliveries"] == 2  # taken again after the kill, not finished by the killed worker


def test_reaper_requeues_a_job_whose_worker_vanished(hardened: Hardened, models: dict[str, Path]) -> None:
    hardened.stack.start_worker("worker2")
    try:
        job_id = hardened.alpha.submit(models["medium"], MEDIUM).json()["id"]
        child = compression_process(job_id)
        stack_pids = {p.pid: name for name, p in hardened.stack.processes.items()}
        vanished = next(stack_pids[p.pid] for p in child.parents() if p.pid in stack_pids)  # through bwrap's processes

        hardened.stack.kill_process(vanished)  # never started again: the other worker must take over
        child.wait(timeout=30)
        assert not child.is_running()  # the fault struck: the job's compression process died with its worker
        survivor = "worker2" if vanished == "worker" else "worker"

        job = hardened.alpha.wait(job_id, timeout=180)
        assert job["state"] == "succeeded", job["error"]
        assert job["deliveries"] == 2  # taken over ...
        assert (
            f"job {job_id}: running (attempt 2)" in (hardened.stack.log_dir / f"{survivor}.log").read_text()
        )  # ... here
    finally:
        if "worker" not in hardened.stack.processes:
            hardened.stack.start_worker()


def test_redis_restart_mid_run_loses_no_job(hardened: Hardened, models: dict[str, Path]) -> None:
    ids = [
        hardened.alpha.submit(models["medium"], {**MEDIUM, "evaluation": {"runs": 10, "warmup": 0}}).json()["id"]
        for _ in range(4)
    ]
    compression_process(ids[0])
    redis = hardened.stack.processes["redis"]
    unfinished = [job_id for job_id in ids if hardened.alpha.job(job_id)["state"] in ("queued", "running")]

    hardened.stack.stop_process("redis")
    assert redis.poll() is not None  # the fault struck: Redis is down ...
    assert unfinished, "every job had finished before Redis stopped: nothing ran through the restart"
    down = hardened.alpha.session.get(hardened.alpha.url(f"/v1/jobs/{ids[0]}"))
    assert down.status_code == 503 and "job store is unreachable" in down.json()["detail"]  # ... and the service saw it
    time.sleep(2)  # Redis stays down a while (this is the fault being tested, not a wait for a result)
    hardened.stack.start_redis()
    # The API's connections come back on their own; until they do it answers 503 (what a client retries).
    deadline = time.monotonic() + 60
    while hardened.alpha.session.get(hardened.alpha.url(f"/v1/jobs/{ids[0]}")).status_code == 503:
        assert time.monotonic() < deadline, "the API still answered 503 a minute after Redis came back"
        time.sleep(0.2)

    for job_id in ids:
        job = hardened.alpha.wait(job_id, timeout=240)
        assert job["state"] == "succeeded", job["error"]


def test_a_channel_whose_connection_lost_its_client_raises_a_connection_error_not_attribute_error() -> None:
    """kombu 5.7 closed a Redis channel after the broker went away by asking for a pool while its
    connection's client was None: an AttributeError that stopped the Celery worker (both workers of
    the hardened stack, at a Redis restart, in the suite). workers.celery_app makes it a connection
    error, which the consumer ignores while closing; with a client the parameters come as before."""
    from types import SimpleNamespace

    import redis
    from kombu import Connection
    from kombu.transport import redis as kombu_redis

    import workers.celery_app  # noqa: F401  (applies the fix)

    lost = SimpleNamespace(connection=SimpleNamespace(client=None))
    with pytest.raises(redis.exceptions.ConnectionError):
        kombu_redis.Channel._connparams(lost)
    assert redis.exceptions.ConnectionError in kombu_redis.Transport.connection_errors

    # Positive control: a channel whose connection has its client gets its parameters as before (made
    # without __init__, which connects; the rest are the class's defaults).
    channel = object.__new__(kombu_redis.Channel)
    channel.connection = Connection("redis://:secret@127.0.0.1:6399/3").transport
    params = kombu_redis.Channel._connparams(channel)
    assert params["host"] == "127.0.0.1" and params["port"] == 6399 and params["db"] == 3
