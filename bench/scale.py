"""Big models: memory and time of a job as the model grows, through the HTTP API under `make run` defaults.

Starts ``python -m modelpress.stack`` (what ``make run`` runs) with its default limits (2048 MB
uploads, 8192 MB of resident memory per job, one worker), builds scripted stacks of
LayerNorm -> Linear(d, 4d) -> ReLU -> Linear(4d, d) blocks with residuals (d=1024, about 33.6 MB
a block) at each ``--sizes`` (MB), uploads each with the client and runs dynamic int8
quantization and unstructured pruning (0.5, global) on it. Per job: the job process's peak
resident memory (its own ``ru_maxrss``, from the report, and the bench's samples of the whole
sandboxed process tree), the report's time per stage (load, transform, save, measure), the
upload, and submission to success. In the same run, the hand-made baseline: a fresh process
builds the same ``nn.Module`` and runs eager ``torch.ao.quantization.quantize_dynamic`` on it, or
``torch.nn.utils.prune.global_unstructured`` (L1, 0.5), and reports its peak resident memory and
time. One job at a time; each model is deleted before the next is built. Prints a table and
writes bench/results/scale.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.client import Client  # noqa: E402
from modelpress.stack import free_port  # noqa: E402
from workers.memory import MemoryWatch  # noqa: E402

D = 1024
BLOCK_BYTES = (2 * 4 * D * D + 4 * D + D + 2 * D) * 4  # two Linear layers and a LayerNorm, float32
INPUT_SHAPE = [8, D]
SPECS = {
    "quantize": {"method": "quantize", "input_shape": INPUT_SHAPE},
    "prune": {"method": "prune", "input_shape": INPUT_SHAPE, "prune": {"amount": 0.5}},
}

# Runs in a fresh interpreter from a file (TorchScript reads the source): builds the model, then saves
# it scripted or runs the eager baseline.
WORKER = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from torch import nn
torch.set_num_threads(int(sys.argv[4]))

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))

class Net(nn.Module):
    def __init__(self, blocks, d):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(blocks)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

torch.manual_seed(0)
with torch.no_grad():
    model = Net(int(sys.argv[2]), int(sys.argv[3])).eval()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
if sys.argv[1] == "save":
    torch.jit.script(model).save(sys.argv[5])
    print(json.dumps({}))
    sys.exit(0)
built = peak()
start = time.perf_counter()
if sys.argv[1] == "quantize":
    result = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
else:
    import torch.nn.utils.prune as prune
    layers = [(m, "weight") for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.5)
    for m, name in layers:
        prune.remove(m, name)
    result = model
seconds = time.perf_counter() - start
with torch.no_grad():
    result(torch.randn(8, int(sys.argv[3])))
print(json.dumps({"peak_resident_mb": peak(), "after_build_mb": built, "transform_s": round(seconds, 2)}))
"""


def build(worker: Path, blocks: int, path: Path, threads: int) -> None:
    subprocess.run(
        [sys.executable, str(worker), "save", str(blocks), str(D), str(threads), str(path)],
        check=True,
        capture_output=True,
    )


def baseline(worker: Path, method: str, blocks: int, threads: int, cap_mb: int) -> dict[str, Any]:
    """The eager baseline in a fresh process, stopped once it holds more than ``cap_mb`` resident
    (eager global pruning of a 2 GB model passed 10 GB here: the machine is shared)."""
    process = subprocess.Popen(
        [sys.executable, str(worker), method, str(blocks), str(D), str(threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    watch = MemoryWatch(process.pid, cap_mb << 20, process.kill).start()
    output, _ = process.communicate()
    watch.stop()
    if watch.exceeded:
        return {"peak_resident_mb": f"> {cap_mb}", "transform_s": "stopped"}
    return json.loads(output.strip().splitlines()[-1])


class TreePeak:
    """Samples the resident memory of a job's sandboxed process tree (bubblewrap and the job process)."""

    def __init__(self, job_id: str) -> None:
        self.job_id, self.peak_mb, self._stop = job_id, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            resident = 0
            for process in psutil.process_iter(["cmdline"]):
                cmdline = process.info["cmdline"] or []
                if "workers.job_process" in cmdline and any(arg.endswith(self.job_id) for arg in cmdline):
                    try:
                        resident += process.memory_info().rss
                    except psutil.Error:
                        pass
            self.peak_mb = max(self.peak_mb, resident >> 20)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_job(client: Client, model: Path, method: str) -> dict[str, Any]:
    start = time.monotonic()
    job = client.submit(model, SPECS[method])
    uploaded = time.monotonic()
    sampler = TreePeak(job["id"])
    final = client.wait(job, timeout=3600)
    tree_peak = sampler.stop()
    end = time.monotonic()
    row: dict[str, Any] = {
        "state": final["state"],
        "upload_s": round(uploaded - start, 1),
        "end_to_end_s": round(end - start, 1),
        "tree_peak_resident_mb": tree_peak,
    }
    if final["state"] != "succeeded":
        row["error"] = final.get("error")
        return row
    report = client.session.get(client.url + f"/v1/jobs/{job['id']}/report", timeout=60).json()
    row.update(
        {
            "peak_resident_mb": report["resources"]["peak_resident_mb"],
            "memory_limit_mb": report["resources"]["memory_limit_mb"],
            "stages_s": report["timings_s"],
            "size_ratio": report["size"]["ratio"],
            "deflate_ratio": round(report["size"]["deflate_bytes_after"] / report["size"]["bytes_before"], 4),
            "latency_ratio": report["latency"]["ratio"],
            "latency_runs_timed": report["latency"]["runs_timed"],
            "cosine": report["fidelity"]["cosine_similarity"],
        }
    )
    return row


def main() -> None:
    parser = arguments(__doc__, "scale")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 500, 1000, 2000],
        help="model sizes in MB (rounded to whole blocks of 33.6 MB)",
    )
    parser.add_argument("--methods", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--baseline-cap-mb",
        type=int,
        default=6144,
        help="stop a baseline that holds more resident memory than this (the machine is shared)",
    )
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    args = parser.parse_args()
    prepare(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the clean-up below: stop the stack
    rows: list[dict[str, Any]] = json.loads(args.out.read_text())["rows"] if args.append and args.out.exists() else []
    with tempfile.TemporaryDirectory(prefix="modelpress-scale-") as directory:
        workdir = Path(directory)
        worker = workdir / "build_model.py"
        worker.write_text(WORKER)
        port = free_port()
        env = {
            **os.environ,
            "MODELPRESS_DATA_DIR": str(workdir / "data"),
            "MODELPRESS_PORT": str(port),
            "MODELPRESS_REDIS_PORT": str(free_port()),
        }
        env.pop("REDIS_URL", None)
        for name in [
            n
            for n in env
            if n.startswith("MODELPRESS_")
            and n not in ("MODELPRESS_DATA_DIR", "MODELPRESS_PORT", "MODELPRESS_REDIS_PORT")
        ]:
            env.pop(name)  # `make run` defaults: nothing else set
        with open(workdir / "stack.log", "wb") as log_file:
            stack = subprocess.Popen(
                [sys.executable, "-m", "modelpress.stack"],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            client = Client(f"http://127.0.0.1:{port}", timeout=600)
            deadline = time.monotonic() + 180
            while not _ready(client):
                if time.monotonic() > deadline or stack.poll() is not None:
                    raise SystemExit(f"the stack did not start; see {workdir / 'stack.log'}")
                time.sleep(1)
            for size in args.sizes:
                blocks = max(1, round(size * 1e6 / BLOCK_BYTES))
                model = workdir / f"stack-{blocks}.pt"
                build(worker, blocks, model, args.threads)
                model_mb = model.stat().st_size / 1e6
                for method in args.methods:
                    row = {
                        "size_mb": round(model_mb),
                        "blocks": blocks,
                        "method": method,
                        **run_job(client, model, method),
                    }
                    if not args.no_baseline:
                        row["baseline"] = baseline(worker, method, blocks, args.threads, args.baseline_cap_mb)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    _write(args, rows)  # after every job: a long run interrupted keeps what it measured
                model.unlink()
        finally:  # also on Ctrl-C / SIGTERM of this script (see the handler in main)
            os.killpg(stack.pid, signal.SIGTERM)
            stack.wait(timeout=120)
    _table(rows)
    _write(args, rows)


def _write(args: Any, rows: list[dict[str, Any]]) -> None:
    write_results(
        args,
        {
            "machine": machine(
                args,
                d=D,
                input_shape=INPUT_SHAPE,
                defaults="make run (upload 2048 MB, job memory 8192 MB resident, 1 worker)",
                load_average=os.getloadavg()[0],
            ),
            "rows": rows,
        },
    )


def _ready(client: Client) -> bool:
    try:
        return client.session.get(client.url + "/readyz", timeout=5).status_code == 200
    except Exception:
        return False


def _table(rows: list[dict[str, Any]]) -> None:
    print(
        "| model MB | method | job peak RSS MB | peak / model | load s | transform s | save s | measure s | "
        "upload s | end to end s | baseline peak RSS MB | baseline transform s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        stages, base, peak = row.get("stages_s", {}), row.get("baseline", {}), row.get("peak_resident_mb")
        cells = [
            row["size_mb"],
            row["method"],
            peak if peak else row["state"],
            f"{peak / row['size_mb']:.2f}" if peak else "-",
            *(stages.get(stage, "-") for stage in ("load", "transform", "save", "measure")),
            row["upload_s"],
            row["end_to_end_s"],
            base.get("peak_resident_mb", "-"),
            base.get("transform_s", "-"),
        ]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


if __name__ == "__main__":
    main()
