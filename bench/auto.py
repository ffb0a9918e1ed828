"""Benchmark of pipelines and the search toward a target, on a CNN trained on scikit-learn's digits.

    .venv/bin/python bench/auto.py [--threads 2] [--budget 900] [--out bench/results/auto.json]

The service (the engine's ``compress``, as a job runs it) sees only the training split, with labels;
test accuracy is measured here on the held-out quarter it never saw. Rows:
- the original;
- the pipeline prune 0.5 structured + fine-tune, then static int8;
- ``auto`` with target accuracy max_drop 0.01, objective size;
- the baseline, in the same run and at the same time budget: the best single method toward the same
  target (static int8 alone, and structured pruning with fine-tuning whose amount the search tunes).
Prints a table and writes JSON.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.spec import parse_spec  # noqa: E402
from tests.models import DigitsCNN, digits_splits, save_scripted, test_accuracy, train_classifier  # noqa: E402
from workers.engine.errors import CompressionError  # noqa: E402
from workers.engine.run.pipeline import compress  # noqa: E402

FINETUNE = {"epochs": 5, "lr": 2e-3, "batch_size": 64}


def main() -> None:
    parser = arguments(__doc__, "auto")
    parser.add_argument("--budget", type=int, default=900, help="search time budget in seconds (both searches)")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    prepare(args)
    torch.manual_seed(0)
    splits = digits_splits()
    model = train_classifier(DigitsCNN(), splits["x_train"], splits["y_train"], epochs=15)
    original_accuracy = test_accuracy(model, splits["x_test"], splits["y_test"])
    target = {"metric": "accuracy", "max_drop": 0.01, "objective": "size"}
    search = {"max_trials": 8, "time_budget_s": args.budget}
    evaluation = {"runs": args.runs, "warmup": 2}
    specs = {
        "pipeline prune 0.5 structured + fine-tune + static": {
            "method": "pipeline",
            "evaluation": evaluation,
            "steps": [
                {"method": "prune", "prune": {"amount": 0.5, "structured": True, "finetune": FINETUNE}},
                {"method": "quantize", "quantize": {"mode": "static"}},
            ],
        },
        "auto (accuracy max_drop 0.01, size)": {
            "method": "auto",
            "target": target,
            "search": search,
            "evaluation": evaluation,
        },
        "baseline: static int8 alone": {"method": "quantize", "quantize": {"mode": "static"}, "evaluation": evaluation},
        "baseline: prune structured + fine-tune, amount searched": {
            "method": "pipeline",
            "target": target,
            "search": search,
            "evaluation": evaluation,
            "steps": [{"method": "prune", "prune": {"amount": 0.5, "structured": True, "finetune": FINETUNE}}],
        },
    }
    rows = [
        {
            "run": "original",
            "bytes": None,
            "bytes_ratio": 1.0,
            "test_accuracy": original_accuracy,
            "drop_points": 0.0,
            "time_s": None,
            "trials": None,
            "chosen": None,
        }
    ]
    print(f"{'run':<58} {'bytes':>7} {'ratio':>7} {'test acc':>8} {'drop':>6} {'time s':>7}  chosen")
    print(f"{'original':<58} {'':>7} {1.0:7.3f} {original_accuracy:8.4f}")
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        path = save_scripted(model, work / "digits.pt")
        data = work / "train.npz"
        np.savez(data, inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
        for name, raw in specs.items():
            spec = parse_spec(raw, has_data=True)
            output = work / "out.pt"
            started = time.perf_counter()
            try:
                report = compress(path, spec, output, data_path=data)
            except CompressionError as error:
                rows.append({"run": name, "error": str(error), "report": getattr(error, "report", None)})
                print(f"{name:<58} failed: {error}", flush=True)
                continue
            elapsed = time.perf_counter() - started
            compressed = torch.jit.load(str(output))
            accuracy = test_accuracy(compressed, splits["x_test"], splits["y_test"])
            trials = report.get("trials")
            chosen = report.get("details", {}).get("chosen", "")
            rows.append(
                {
                    "run": name,
                    "bytes": report["size"]["bytes_after"],
                    "bytes_ratio": report["size"]["ratio"],
                    "test_accuracy": accuracy,
                    "drop_points": round(100 * (original_accuracy - accuracy), 2),
                    "latency_ratio": report["latency"]["ratio"],
                    "time_s": round(elapsed, 1),
                    "trials": _trials(trials),
                    "chosen": chosen,
                    "target": report.get("target"),
                    "pareto_front": report.get("pareto_front"),
                }
            )
            print(
                f"{name:<58} {report['size']['bytes_after']:7d} {report['size']['ratio']:7.3f} {accuracy:8.4f} "
                f"{100 * (original_accuracy - accuracy):6.2f} {elapsed:7.1f}  {chosen}",
                flush=True,
            )
            for trial in trials or []:
                print(
                    f"    trial {trial['trial']}: {trial['label']:<52} "
                    + (
                        f"{trial['bytes']:7d} {trial['size_ratio']:7.3f} held-out acc {trial['metric']:.4f} "
                        f"{'meets' if trial['meets_target'] else 'misses'} {trial['time_s']:6.1f} s"
                        if trial.get("bytes")
                        else trial.get("error", "")
                    ),
                    flush=True,
                )
    write_results(
        args,
        {
            "machine": machine(args),
            "original_test_accuracy": original_accuracy,
            "test_rows": len(splits["y_test"]),
            "train_rows": len(splits["y_train"]),
            "rows": rows,
        },
    )


def _trials(trials: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if trials is None:
        return None
    keep = (
        "trial",
        "label",
        "bytes",
        "size_ratio",
        "latency_ms",
        "macs",
        "metric",
        "meets_target",
        "time_s",
        "stopped_early",
        "error",
    )
    return [{k: t[k] for k in keep if k in t} for t in trials]


if __name__ == "__main__":
    main()
