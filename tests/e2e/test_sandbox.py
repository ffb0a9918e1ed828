"""Attacks by models on the service's files, other jobs, processes and network, through real jobs.

The confinement is proven alone: the stack here runs with ``MODELPRESS_OP_CHECK=off``, so neither
the submit-time scan nor the in-job graph walk stops ``torch.from_file``; only the sandbox does.
The op checks are tested on their own below (a stack with the defaults) and in tests/engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import shutil
import socket
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.keys import hash_key
from modelpress.stack import Stack
from tests.conftest import ApiClient, make_settings
from tests.models import SmallConvNet, save_scripted
from workers.sandbox import gpu_devices

QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
KEY = "mp_sandbox-tenant-key"


@dataclass
class Confined:
    stack: Stack
    client: ApiClient
    secret: bytes
    secret_file: Path


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Confined]:
    root = tmp_path_factory.mktemp("confined")
    secret = b"SECRET-" + secrets.token_hex(24).encode()
    (root / "keys").write_text(f"tenant sha256:{hash_key(KEY)}\n")
    data = root / "data"
    data.mkdir()
    secret_file = data / "planted-secret.txt"
    secret_file.write_bytes(secret)
    settings = make_settings(
        data,
        redis_url=None,
        api_keys_file=root / "keys",
        op_check="off",
        webhook_secret=secret.decode(),
        job_timeout_s=120,
    )
    stack = Stack(settings, log_dir=root / "logs")
    try:
        stack.start()
        client = ApiClient(stack.base_url)
        client.session.headers["Authorization"] = f"Bearer {KEY}"
        yield Confined(stack, client, secret, secret_file)
    finally:
        stack.stop()


class ReadFile(nn.Module):
    """Copies ``size`` bytes of ``path`` into a buffer that the compressed model keeps."""

    def __init__(self, path: str, size: int, shared: bool = False) -> None:
        super().__init__()
        self.path, self.size, self.shared = path, size, shared
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("loot", torch.zeros(size, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, self.shared, self.size, dtype=torch.uint8)
        if self.shared:
            data.fill_(0)  # writes through to the file
        self.loot.copy_(data)
        return self.conv(x) + self.loot.float().sum() * 0.0


def _run(confined: Confined, model: nn.Module, tmp_path: Path) -> dict:
    response = confined.client.submit(save_scripted(model, tmp_path / "attack.pt"), QUICK)
    assert response.status_code == 202, response.text
    return confined.client.wait(response.json()["id"], timeout=180)


def _assert_refused_as_absent(job: dict, path: str) -> None:
    """The attack failed because the path does not exist in the sandbox, not for another reason."""
    assert job["state"] == "failed", "the model read a file outside its job"
    assert job["error"]["type"].endswith("/invalid-input"), job["error"]
    assert "No such file or directory" in job["error"]["detail"] and path in job["error"]["detail"], job["error"]


def _assert_nothing_leaked(confined: Confined, job: dict, needle: bytes) -> None:
    """Neither the job record, its error, report, model nor any file it produced holds ``needle``."""
    import json

    assert needle not in json.dumps(job).encode()
    job_dir = confined.stack.settings.data_dir / "jobs" / job["id"]
    produced = [path for path in job_dir.rglob("*") if path.is_file() and "input" not in path.parts]
    for path in produced:
        assert needle not in path.read_bytes(), path
    if job["state"] == "succeeded":
        for link in ("model", "report"):
            assert needle not in confined.client.session.get(confined.client.url(job["links"][link])).content


def test_the_attacking_model_reads_what_it_may_read(confined: Confined, tmp_path: Path) -> None:
    """The positive control of every attack below: the same model, reading its own input, succeeds
    and carries the bytes it read out in its result, so a failure below is the sandbox's doing."""
    upload = save_scripted(ReadFile("input/model.pt", 64), tmp_path / "attack.pt")  # relative to its job directory
    job = _run(confined, ReadFile("input/model.pt", 64), tmp_path)

    assert job["state"] == "succeeded", job["error"]
    served = confined.client.session.get(
        confined.client.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}
    ).content
    loot = torch.jit.load(io.BytesIO(served)).loot
    assert bytes(loot.tolist()) == upload.read_bytes()[:64]  # the first 64 bytes of its own upload, read inside
    # The attacks here meet the sandbox that jobs get by default: a process forked by the fork server, which
    # built its namespaces and mounts itself (workers/fork_sandbox.py); tests/e2e/test_warm_sandbox.py and
    # the stacks with MODELPRESS_WARM_SANDBOX=off meet bubblewrap's.
    report = confined.client.session.get(confined.client.url(job["links"]["report"])).json()
    assert (report["sandbox"]["start"], report["sandbox"]["started_by"]) == ("warm", "fork server")


@pytest.mark.parametrize("how", ["absolute", "relative", "through /proc/<worker pid>/root"])
def test_a_model_cannot_read_a_secret_of_the_service(confined: Confined, tmp_path: Path, how: str) -> None:
    worker_pid = confined.stack.processes["worker"].pid
    path = {
        "absolute": str(confined.secret_file),
        "relative": "../../planted-secret.txt",  # from the job's own directory, data/jobs/<id>
        "through /proc/<worker pid>/root": f"/proc/{worker_pid}/root{confined.secret_file}",
    }[how]
    unconfined_view = os.path.realpath(confined.stack.settings.data_dir / "jobs" / "some-job" / path)
    assert Path(unconfined_view).read_bytes() == confined.secret  # outside the sandbox the path does reach the secret
    job = _run(confined, ReadFile(path, len(confined.secret)), tmp_path)

    _assert_nothing_leaked(confined, job, confined.secret)
    _assert_refused_as_absent(job, path)
    assert f"<{len(confined.secret)}>" not in job["error"]["detail"]  # not even the file's size, as torch writes it


def test_a_model_cannot_read_the_api_keys_file(confined: Confined, tmp_path: Path) -> None:
    content = confined.stack.settings.api_keys_file.read_bytes()
    job = _run(confined, ReadFile(str(confined.stack.settings.api_keys_file), len(content)), tmp_path)

    _assert_nothing_leaked(confined, job, content.strip())
    _assert_refused_as_absent(job, str(confined.stack.settings.api_keys_file))


def test_a_model_cannot_open_the_memory_of_its_sandbox_s_init(confined: Confined, tmp_path: Path) -> None:
    """PID 1 of a forked sandbox is a small init with the job's uid: were it dumpable, the job could write its
    memory through /proc/1/mem (no Yama here) and make it outlive every kill (red team). Its own memory file
    opens (torch then finds it 0 bytes long: a /proc file), which shows the open is what is refused."""
    own = _run(confined, ReadFile("/proc/self/mem", 8), tmp_path)
    assert own["state"] == "failed" and "</proc/self/mem> size <0>" in own["error"]["detail"], own["error"]

    job = _run(confined, ReadFile("/proc/1/mem", 8), tmp_path)

    assert job["state"] == "failed"
    assert "Permission denied" in job["error"]["detail"] and "/proc/1/mem" in job["error"]["detail"], job["error"]


def test_a_model_cannot_read_or_overwrite_another_jobs_files(confined: Confined, tmp_path: Path) -> None:
    victim_model = SmallConvNet()
    with torch.no_grad():
        victim_model.conv.bias.copy_(torch.arange(victim_model.conv.bias.numel(), dtype=torch.float32) + 1234.5)
    victim = _run(confined, victim_model, tmp_path)
    assert victim["state"] == "succeeded", victim["error"]
    victim_dir = confined.stack.settings.data_dir / "jobs" / victim["id"]
    victim_input, victim_output = victim_dir / "input" / "model.pt", victim_dir / "output" / "model.pt"
    input_bytes, output_bytes = victim_input.read_bytes(), victim_output.read_bytes()
    marker = victim_model.conv.bias.detach().numpy().tobytes()
    assert marker in input_bytes  # the needle is really in the victim's file

    reader = _run(confined, ReadFile(str(victim_input), len(input_bytes)), tmp_path)
    writer = _run(confined, ReadFile(str(victim_output), len(output_bytes), shared=True), tmp_path)

    _assert_nothing_leaked(confined, reader, marker)
    assert victim_input.read_bytes() == input_bytes
    assert victim_output.read_bytes() == output_bytes
    _assert_refused_as_absent(reader, str(victim_input))
    _assert_refused_as_absent(writer, str(victim_output))
    assert hashlib.sha256(output_bytes).hexdigest() == confined.client.job(victim["id"])["result"]["sha256"]


def test_the_job_process_has_no_network_and_no_secrets_in_its_environment(confined: Confined, tmp_path: Path) -> None:
    redis_port = confined.stack.settings.redis_port
    socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()  # reachable from outside the sandbox

    job = _run(confined, SmallConvNet(), tmp_path)
    assert job["state"] == "succeeded", job["error"]
    report = confined.client.session.get(confined.client.url(job["links"]["report"])).json()
    sandbox = report["sandbox"]

    assert sandbox["network_probe"].startswith(f"connection to 127.0.0.1:{redis_port} failed")
    assert sandbox["network"] == "isolated"
    assert sandbox["mode"] == "on"
    assert sandbox["processes"] <= 3 and sandbox["data_dir_visible"] is False
    assert (
        sandbox["seccomp"] == "filtered"
    )  # the syscall filter, seen from inside (tests/security/test_syscall_filter.py)
    # The GPU device nodes the job sees are the host's (none here), and torch says whether CUDA ran.
    assert report["device"]["gpu_device_nodes"] == gpu_devices()
    assert report["device"]["cuda_available"] is torch.cuda.is_available()
    assert not {"REDIS_URL", "MODELPRESS_API_KEYS_FILE", "MODELPRESS_WEBHOOK_SECRET", "HOME"} & set(
        sandbox["environment"]
    )


def test_readyz_reports_the_sandbox_and_details_need_a_key(confined: Confined) -> None:
    anonymous = ApiClient(confined.stack.base_url)
    assert anonymous.session.get(anonymous.url("/healthz")).status_code == 200
    assert anonymous.session.get(anonymous.url("/readyz")).json() == {"status": "ready"}
    assert anonymous.session.get(anonymous.url("/metrics")).status_code == 401
    detailed = confined.client.session.get(confined.client.url("/readyz")).json()
    assert set(detailed["sandbox"].values()) == {"confined"}
    assert confined.client.session.get(confined.client.url("/metrics")).status_code == 200


# ----------------------------------------------------------------------------- fail closed


def test_a_job_fails_closed_when_the_sandbox_cannot_be_set_up(tmp_path: Path) -> None:
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    broken.chmod(0o755)
    with _job_under(broken, tmp_path) as (client, job):
        assert "No permissions to create new namespace" in job["error"]["detail"]
        ready = client.session.get(client.url("/readyz"))
        assert ready.status_code == 503
        assert "sandbox-unavailable" in ready.json()["detail"]
        assert "job sandbox unavailable" in (tmp_path / "logs" / "worker.log").read_text()


def test_a_job_fails_closed_when_its_syscall_filter_is_missing(tmp_path: Path) -> None:
    """bubblewrap that drops ``--seccomp``: the job sees no filter from inside and refuses to run."""
    real = shutil.which("bwrap")
    assert real
    unfiltered = tmp_path / "bwrap"
    unfiltered.write_text(
        f"#!{sys.executable}\nimport os, sys\nargs = sys.argv[1:]\nat = args.index('--seccomp')\n"
        f"del args[at:at + 2]\nos.execv({real!r}, [{real!r}, *args])\n"
    )
    unfiltered.chmod(0o755)
    with _job_under(unfiltered, tmp_path) as (client, job):
        assert "no syscall filter (not filtered: Seccomp mode 0)" in job["error"]["detail"]
        assert "no syscall filter" in client.session.get(client.url("/readyz")).json()["detail"]


@contextlib.contextmanager
def _job_under(bwrap: Path, tmp_path: Path) -> Iterator[tuple[ApiClient, dict]]:
    """A stack whose worker runs jobs with ``bwrap`` instead of bubblewrap, and one job it failed
    closed (``sandbox-unavailable``) with nothing left in ``output/``. Jobs start cold, so bubblewrap
    builds their sandbox: a pre-started one is forked by the fork server, which builds its own
    (workers/fork_sandbox.py) and meets the same in-job check."""
    settings = make_settings(tmp_path / "data", redis_url=None, bwrap=str(bwrap), warm_sandbox=False)
    stack = Stack(settings, log_dir=tmp_path / "logs")
    try:
        stack.start()
        client = ApiClient(stack.base_url)
        job = client.wait(
            client.submit(save_scripted(SmallConvNet(), tmp_path / "m.pt"), QUICK).json()["id"], timeout=120
        )
        assert job["state"] == "failed"
        assert job["error"]["type"].endswith("/sandbox-unavailable")
        assert not (tmp_path / "data" / "jobs" / job["id"] / "output" / "model.pt").exists()
        yield client, job
    finally:
        stack.stop()


# ----------------------------------------------------------------------------- the op checks alone


def test_a_model_calling_a_file_operator_is_refused_at_submit(api: ApiClient, tmp_path: Path) -> None:
    response = api.submit(save_scripted(ReadFile("/etc/hostname", 4), tmp_path / "reader.pt"), QUICK)

    assert response.status_code == 422
    message = response.json()["errors"]["model"][0]
    assert "aten::from_file" in message
    assert "hostname" not in message


def test_a_hand_written_archive_calling_a_custom_operator_is_refused_at_submit(api: ApiClient, tmp_path: Path) -> None:
    path = save_scripted(SmallConvNet(), tmp_path / "genuine.pt")
    forged, replaced = io.BytesIO(), 0
    with zipfile.ZipFile(path) as genuine, zipfile.ZipFile(forged, "w") as archive:
        for entry in genuine.infolist():
            body = genuine.read(entry)
            if "/code/" in entry.filename and entry.filename.endswith(".py") and b"torch.relu(" in body:
                body, replaced = body.replace(b"torch.relu(", b"(ops .\n   evil.run)("), replaced + 1
            archive.writestr(entry.filename, body)
    assert replaced == 1

    response = api.submit(forged.getvalue(), QUICK)

    assert response.status_code == 422
    assert "evil::run" in response.json()["errors"]["model"][0]
