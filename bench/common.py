"""What every benchmark script shares: arguments, set-up, the machine's description, the JSON file."""
from __future__ import annotations

import argparse
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), **facts}


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
