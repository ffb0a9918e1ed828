"""Overhead of a tiny job (issue 28): 30 sequential jobs through the HTTP API of a stack started like
`make run`, with the pre-warmed sandbox on and off, beside the same compression in-process.

Two stacks (``python -m modelpress.stack``, defaults but for their ports and data directories), one
with ``MODELPRESS_WARM_SANDBOX=1`` and one with ``0``, both up for the whole run; the jobs go in
blocks of ``--block`` back-to-back jobs per stack, alternating, so drifting load on the machine hits
both alike while each block stays a true sequential stream (the next job submitted as soon as the
previous one's model is downloaded). Each job: a 4 MB two-layer model (two Linear 1024x512),
dynamic int8, the default evaluation. Per job: started-to-finished (the record's timestamps),
submit-to-downloaded (this client's clock), the report's ``timings_s`` (``startup`` is the
supervisor's). The baseline is a fresh ``python -c`` that imports torch, loads the model,
``quantize_dynamic`` and saves it. Prints a table, writes ``bench/results/overhead.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.stack import free_port  # noqa: E402

SPEC = {"method": "quantize", "quantize": {"mode": "dynamic"}, "input_shape": [1, 1024]}
BASELINE = """
import sys, time
began = time.perf_counter()
import torch
imported = time.perf_counter()
torch.set_num_threads(int(sys.argv[3]))
model = torch.jit.load(sys.argv[1])
loaded = time.perf_counter()
quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
done = time.perf_counter()
torch.jit.save(torch.jit.script(quantized), sys.argv[2])
saved = time.perf_counter()
print(imported - began, loaded - imported, done - loaded, saved - done)
"""


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(1024, 512), nn.Linear(512, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def start_stack(workdir: Path, warm: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "MODELPRESS_DATA_DIR": str(workdir / "data"),
        "MODELPRESS_PORT": str(port),
        "MODELPRESS_REDIS_PORT": str(free_port()),
        "MODELPRESS_WARM_SANDBOX": "1" if warm else "0",
        "MODELPRESS_MAX_ACTIVE_JOBS": "1000",
    }
    env.pop("REDIS_URL", None)
    with open(workdir / "stack.log", "wb") as log_file:
        stack = subprocess.Popen(
            [sys.executable, "-m", "modelpress.stack"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/readyz", timeout=2).status_code == 200:
                return stack, base
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the stack in {workdir} did not become ready")


def one_job(session: requests.Session, base: str, model: bytes, poll_s: float) -> dict[str, Any]:
    began = time.monotonic()
    answer = session.post(
        base + "/v1/jobs", files={"model": ("model.pt", model)}, data={"spec": json.dumps(SPEC)}, timeout=60
    )
    if answer.status_code != 202:
        raise SystemExit(f"submit refused: {answer.status_code} {answer.text[:300]}")
    job_id = answer.json()["id"]
    while True:
        job = session.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(poll_s)
    if job["state"] != "succeeded":
        raise SystemExit(f"job {job_id} {job['state']}: {job.get('error')}")
    downloaded = session.get(base + job["links"]["model"], timeout=60).content
    submit_to_downloaded = time.monotonic() - began
    report = session.get(base + job["links"]["report"], timeout=30).json()
    return {
        "id": job_id,
        "started_to_finished_s": _seconds(job["started_at"], job["finished_at"]),
        "submitted_to_started_s": _seconds(job["created_at"], job["started_at"]),
        "submit_to_downloaded_s": round(submit_to_downloaded, 3),
        "bytes": len(downloaded),
        "start": report["sandbox"].get("start"),
        "started_by": report["sandbox"].get("started_by"),
        "timings_s": report["timings_s"],
    }


def baseline(model_path: Path, workdir: Path, threads: int, runs: int) -> list[dict[str, float]]:
    rows = []
    for _ in range(runs):
        began = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", BASELINE, str(model_path), str(workdir / "baseline.pt"), str(threads)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        total = time.monotonic() - began
        rows.append(
            {
                "process_s": round(total, 3),
                **{
                    name: round(float(value), 3)
                    for name, value in zip(("import_torch_s", "load_s", "quantize_s", "save_s"), out)
                },
            }
        )
    return rows


def summary(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 3)

    return {
        "jobs": len(rows),
        "median_started_to_finished_s": median("started_to_finished_s"),
        "median_submit_to_downloaded_s": median("submit_to_downloaded_s"),
        "median_queued_s": median("submitted_to_started_s"),
        "median_startup_s": round(statistics.median(row["timings_s"]["startup"] for row in rows), 3),
        "median_measure_s": round(statistics.median(row["timings_s"]["measure"] for row in rows), 3),
        "warm_jobs": sum(row["start"] == "warm" for row in rows),
        "forked_jobs": sum(row["start"] == "warm" and row.get("started_by") == "fork server" for row in rows),
        "jobs_per_minute": round(60 * len(rows) / wall_s, 1),
    }


def main() -> None:
    parser = arguments(__doc__, "overhead")
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between the client's polls")
    args = parser.parse_args()
    prepare(args)
    with tempfile.TemporaryDirectory(prefix="overhead-") as directory:
        workdir = Path(directory)
        model_path = workdir / "model.pt"
        torch.jit.save(torch.jit.script(TwoLayers().eval()), model_path)
        model = model_path.read_bytes()
        stacks = {}
        try:
            for name, warm in (("warm", True), ("cold", False)):
                (workdir / name).mkdir()
                stacks[name] = start_stack(workdir / name, warm)
            rows: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
            after_idle: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
            walls = {"warm": 0.0, "cold": 0.0}
            session = requests.Session()
            while any(len(done) < args.jobs for done in rows.values()):
                for name, (_, base) in stacks.items():
                    count = min(args.block, args.jobs - len(rows[name]))
                    if count <= 0:
                        continue
                    # A block's first job finds the worker idle (the other stack ran meanwhile): kept apart.
                    after_idle[name].append(one_job(session, base, model, args.poll))
                    began = time.monotonic()
                    rows[name] += [one_job(session, base, model, args.poll) for _ in range(count)]
                    walls[name] += time.monotonic() - began
                    print(f"{name}: {len(rows[name])}/{args.jobs}", file=sys.stderr, flush=True)
        finally:
            for stack, _ in stacks.values():
                os.killpg(stack.pid, 15)
                stack.wait(60)
        in_process = baseline(model_path, workdir, args.threads, 5)
    results = {name: summary(found, walls[name]) for name, found in rows.items()}
    for name, found in after_idle.items():
        results[f"{name}_after_idle"] = {
            "jobs": len(found),
            "median_started_to_finished_s": round(statistics.median(row["started_to_finished_s"] for row in found), 3),
            "median_submit_to_downloaded_s": round(
                statistics.median(row["submit_to_downloaded_s"] for row in found), 3
            ),
        }
    results["in_process"] = {key: round(statistics.median(row[key] for row in in_process), 3) for key in in_process[0]}
    print(table(results))
    write_results(
        args,
        {
            "machine": machine(args),
            "spec": SPEC,
            "model_bytes": len(model),
            "summary": results,
            "jobs": rows,
            "after_idle": after_idle,
            "baseline": in_process,
            "when": datetime.now().isoformat(timespec="seconds"),
        },
    )


def table(results: dict[str, Any]) -> str:
    lines = [
        "| run | median started-to-finished (s) | median submit-to-downloaded (s) | median startup (s) | "
        "warm jobs | jobs/min (one worker, sequential) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("warm", "cold"):
        row = results[name]
        lines.append(
            f"| warm sandbox {'on' if name == 'warm' else 'off'} | {row['median_started_to_finished_s']} | "
            f"{row['median_submit_to_downloaded_s']} | {row['median_startup_s']} | {row['warm_jobs']}/"
            f"{row['jobs']} ({row['forked_jobs']} forked) | {row['jobs_per_minute']} |"
        )
    for name in ("warm", "cold"):
        row = results[f"{name}_after_idle"]
        lines.append(
            f"| warm sandbox {'on' if name == 'warm' else 'off'}, a job at an idle worker ({row['jobs']} jobs) "
            f"| {row['median_started_to_finished_s']} | {row['median_submit_to_downloaded_s']} | | | |"
        )
    base = results["in_process"]
    lines.append(
        f"| in-process `import torch; quantize_dynamic` | {base['process_s']} (whole process: import "
        f"{base['import_torch_s']}, quantize {base['quantize_s']}) | - | - | - | - |"
    )
    return "\n".join(lines)


def _seconds(start: str, end: str) -> float:
    def parse(stamp: str) -> datetime:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    return round((parse(end) - parse(start)).total_seconds(), 3)


if __name__ == "__main__":
    main()
