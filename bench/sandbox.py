"""Wall time of one small-model job's process, unconfined (MODELPRESS_SANDBOX=off) and in bubblewrap.

Both run the real ``workers.job_process`` on the same job directory, interleaved, so load on the
machine hits both alike. Prints a table and writes ``bench/results/sandbox.json``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import arguments, machine, prepare, write_results
from modelpress.config import Settings
from modelpress.storage import JobFiles, write_json_atomic
from workers import job_protocol, sandbox

SPEC = {"method": "quantize", "input_shape": [1, 64], "evaluation": {"runs": 5, "warmup": 1}}


def _job_seconds(settings: Settings, files: JobFiles) -> float:
    shutil.rmtree(files.output_model.parent, ignore_errors=True)
    read_fd, write_fd = os.pipe()
    env = job_protocol.child_environment(settings, write_fd, str(sandbox.PROJECT_ROOT))
    argv = [sys.executable, "-m", "workers.job_process", str(files.root)]
    start = time.perf_counter()
    with sandbox.confined(settings, files, argv) as (command, fds):
        child = subprocess.Popen(
            command,
            cwd=files.root,
            env=env,
            pass_fds=[write_fd, *fds],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        messages = pipe.read()
    child.wait()
    elapsed = time.perf_counter() - start
    if child.returncode != 0 or '"succeeded"' not in messages:
        raise SystemExit(f"the job failed ({settings.sandbox}): {messages[-500:]}")
    return elapsed


def _start_seconds(settings: Settings, files: JobFiles) -> float:
    """Start-up alone: an empty interpreter, so the sandbox's own cost is not lost in the job's noise."""
    start = time.perf_counter()
    with sandbox.confined(settings, files, [sys.executable, "-c", "pass"]) as (command, fds):
        subprocess.run(command, pass_fds=fds, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = arguments(__doc__, "sandbox")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    prepare(args)
    with tempfile.TemporaryDirectory() as directory:
        data_dir = Path(directory) / "data"
        files = JobFiles(data_dir / "jobs" / "bench")
        files.input_model.parent.mkdir(parents=True)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        torch.jit.script(model).save(str(files.input_model))
        write_json_atomic(files.spec, SPEC)
        base = Settings(data_dir=data_dir, job_threads=args.threads)
        timings: dict[str, list[float]] = {"job off": [], "job on": [], "start-up off": [], "start-up on": []}
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                settings = base.with_changes(sandbox=mode)
                timings[f"job {mode}"].append(_job_seconds(settings, files))
                timings[f"start-up {mode}"].append(_start_seconds(settings, files))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{'run':<16}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name, values in timings.items():
        print(f"{name:<16}{medians[name]:>10.3f}{min(values):>10.3f}{max(values):>10.3f}")
    difference = {what: medians[f"{what} on"] - medians[f"{what} off"] for what in ("job", "start-up")}
    for what, seconds in difference.items():
        print(f"{what}: sandbox on - off = {seconds:+.3f} s (medians of {args.repeats} interleaved runs)")
    write_results(
        args,
        {
            "machine": machine(args, load_average=os.getloadavg()),
            "spec": SPEC,
            "timings_s": timings,
            "median_s": medians,
            "difference_s": difference,
        },
    )


if __name__ == "__main__":
    main()
