"""Shared fixtures: a real Redis, a real Celery worker and the real API, started like `make run` does."""

from __future__ import annotations

import contextlib
import os
import time

# Tests run in several processes (pytest-xdist, `make test`) beside the jobs they start, on a machine of few
# cores: one thread per process, or OpenMP's spinning threads take turns with each other and run 10x slower.
# Set before anything imports torch, and inherited by the runtimes the tests start as commands.
# Inductor too: its default compiles in a pool of processes, one per core, each importing torch again.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        os.environ[_name] = "1"
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from modelpress.config import Settings
from modelpress.stack import Stack, free_port

pytest_plugins = ["tests.scheduling"]

FINAL_STATES = {"succeeded", "failed", "cancelled"}


class ApiClient:
    """Just enough HTTP for the tests: submit, poll with a bound, download."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()

    def url(self, path: str) -> str:
        return self.base_url + path

    def submit(
        self,
        model: Path | bytes,
        spec: dict[str, Any] | str,
        data: Path | None = None,
        filename: str = "model.pt",
        student: Path | None = None,
    ) -> requests.Response:
        import json

        body = model.read_bytes() if isinstance(model, Path) else model
        files: dict[str, Any] = {"model": (filename, body, "application/octet-stream")}
        if data is not None:
            files["data"] = (data.name, data.read_bytes(), "application/octet-stream")
        if student is not None:
            files["student"] = (student.name, student.read_bytes(), "application/octet-stream")
        form = {"spec": spec if isinstance(spec, str) else json.dumps(spec)}
        return self.session.post(self.url("/v1/jobs"), files=files, data=form, timeout=120)

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.session.get(self.url(f"/v1/jobs/{job_id}"), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, timeout: float = 300, until: set[str] | None = None) -> dict[str, Any]:
        """Poll until the job reaches one of ``until`` (default: a final state), at most ``timeout`` seconds."""
        until = until or FINAL_STATES
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in until:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} ({job.get('stage')}) after {timeout} s")
            time.sleep(0.2)


def compression_process(job_id: str, timeout: float = 60):
    """The job's child process, found by its command line (``workers.job_process <job dir>``), or for a
    pre-started one (``workers.job_process --warm <warm dir>/job``) by the job its warm folder was handed."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            # The Python process itself, not the bubblewrap processes around it (whose command lines hold it too).
            if (
                "workers.job_process" in cmdline
                and not cmdline[0].endswith("bwrap")
                and (cmdline[-1].endswith(job_id) or _warm_label(cmdline) == job_id)
            ):
                if cmdline[1:4] != ["-I", "-S", "-c"]:
                    return process
                # A forked one (workers/fork_sandbox.py): this is its monitor, whose child is the sandbox's
                # init, whose one child runs the job.
                with contextlib.suppress(psutil.Error, IndexError):
                    return process.children()[0].children()[0]
        time.sleep(0.1)
    raise AssertionError(f"no compression process for job {job_id} within {timeout} s")


def job_folder(process) -> str:
    """The folder a job's process was started on (its job's workspace, or a warm folder's ``job/``): the
    last word of its command line, or of its monitor's when it was forked (workers/fork_sandbox.py)."""
    cmdline = process.cmdline()
    return (process.parent().cmdline() if "workers.fork_sandbox" in cmdline else cmdline)[-1]


def warm_processes(data_dir: Path) -> list:
    """The pre-started job processes waiting under ``data_dir`` (handed no job yet)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (
            "--warm" in cmdline
            and "workers.job_process" in cmdline
            and not cmdline[0].endswith("bwrap")
            and Path(cmdline[-1]).is_relative_to(data_dir)
            and _warm_label(cmdline) is None
        ):
            found.append(process)
    return found


def job_children(process) -> list:
    """``process``'s children but the pre-started one waiting for the next job (workers/warm_sandbox.py).
    The fork server (workers/fork_sandbox.py) is not one; the processes it forked for jobs count."""
    import psutil

    found = []
    children = process.children()
    while children:
        child = children.pop()
        try:
            cmdline = child.cmdline()
            if "workers.fork_sandbox" in cmdline:
                children += child.children()
                continue
        except psutil.Error:
            continue
        if not ("--warm" in cmdline and _warm_label(cmdline) is None):
            found.append(child)
    return found


def _warm_label(cmdline: list[str]) -> str | None:
    from workers.warm_folders import JOB_LABEL

    if "--warm" not in cmdline:
        return None
    try:
        return (Path(cmdline[-1]).parent / JOB_LABEL).read_text()
    except OSError:
        return None


def supervisor_process(job_id: str, timeout: float = 60):
    """The Celery pool process supervising the job: the compression process's first ancestor outside
    the sandbox (bubblewrap's own processes sit between them; for a forked one, its monitor and the
    fork server, workers/fork_sandbox.py)."""
    return next(p for p in compression_process(job_id, timeout).parents() if not _sandbox_process(p.cmdline()))


def _sandbox_process(cmdline: list[str]) -> bool:
    """bubblewrap, a fork's monitor (``python -I -S -c``) or the fork server."""
    return cmdline[0].endswith("bwrap") or cmdline[1:4] == ["-I", "-S", "-c"] or "workers.fork_sandbox" in cmdline


def write_keys(path: Path, keys: dict[str, str]) -> Path:
    """An API keys file as an operator writes it: one ``tenant sha256:<hash of key>`` line each."""
    from modelpress.keys import hash_key

    path.write_text("".join(f"{tenant} sha256:{hash_key(key)}\n" for tenant, key in keys.items()))
    return path


def make_settings(tmp: Path, **changes: Any) -> Settings:
    base = Settings.from_env({k: v for k, v in os.environ.items() if k in ("REDIS_URL",)})
    defaults = dict(
        data_dir=tmp,
        port=free_port(),
        redis_port=free_port(),
        api_workers=2,
        max_upload_mb=128,
        job_threads=1,  # jobs of several test processes run at once: see OMP_NUM_THREADS above
        heartbeat_stale_s=4,
        webhook_allow_private=True,
        webhook_backoff_s=0.5,
        log_format="json",
    )
    return base.with_changes(**{**defaults, **changes})


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """A folder built by ``build(folder)`` once for the whole run, whichever test process asks first.

    Under pytest-xdist each process has its own session: the folder lives beside their base temps,
    and a file lock makes the others wait for the first instead of building it again."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / f"once-{name}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("modelpress")
    running = Stack(make_settings(root / "data"), log_dir=root / "logs")
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def api(stack: Stack) -> ApiClient:
    return ApiClient(stack.base_url)
