"""What every benchmark script shares: arguments, set-up, the machine's description, the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# A script run as `python bench/<name>.py` has bench/ first on sys.path, where bench/transformers.py
# would shadow the `transformers` package (bench/targets.py imports it): the scripts import the
# repository's modules from its root (each puts it on sys.path), so bench/ itself comes off.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != RESULTS.parent]


def arguments(description: str, name: str) -> argparse.ArgumentParser:
    """A parser with --threads and --out (``bench/results/<name>.json``); scripts add their own options."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    return parser


def prepare(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")  # TorchScript's deprecation warnings would drown the table
    torch.set_num_threads(args.threads)


def machine(args: argparse.Namespace, **facts: Any) -> dict[str, Any]:
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        **facts,
    }


def raise_priority(nice: int = -10) -> str:
    """Run this process ahead of other work on a shared machine (root only); says what was done.

    Both the nice value and the autogroup's: with autogroups on, Linux shares the CPU between
    sessions first, so a process's own nice value alone does not outrank another terminal's jobs.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        Path(f"/proc/{os.getpid()}/autogroup").write_text(str(nice))
        return f"nice {nice}, autogroup {nice}"
    except OSError as error:
        return f"priority unchanged ({error.strerror})"


def interleaved_medians(
    models: dict[str, Callable[..., Any]], args: tuple[Any, ...], runs: int, warmup: int = 2
) -> dict[str, float]:
    """Median milliseconds per call of each model, timed in rounds of one call each.

    Interleaving spreads a shared machine's changing load over every model alike, where
    timing one model after the other would charge a burst of load to whichever ran then.
    """
    timings: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(*args)
        for _ in range(runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(*args)
                timings[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in timings.items()}


def write_results(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"machine: {payload['machine']}\nwrote {args.out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
