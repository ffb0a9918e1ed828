"""Benchmark of pruning: structured 30/50/70% and unstructured 50/80/90%, with and without fine-tuning.

    .venv/bin/python bench/prune.py [--runs 10] [--threads 2] [--out bench/results/prune.json]

Models: torchvision resnet18 (random weights, batch 8 at 224x224; no accuracy) and a CNN trained
on scikit-learn's digits (fine-tuned on the training split, accuracy on the held-out test split).
Every number comes from the engine's own report of the saved-and-reloaded model, except test
accuracy, measured here. Prints a table and writes JSON.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from tests.models import DigitsCNN, digits_splits, save_scripted, test_accuracy, train_classifier  # noqa: E402
from workers.engine.run.pipeline import compress  # noqa: E402

CONFIGS = [(True, 0.3), (True, 0.5), (True, 0.7), (False, 0.5), (False, 0.8), (False, 0.9)]


def run(
    model_path: Path,
    structured: bool,
    amount: float,
    runs: int,
    input_shape: list[int] | None,
    data_path: Path | None,
    finetune: dict | None,
    workdir: Path,
) -> dict:
    spec = {
        "method": "prune",
        "seed": 0,
        "evaluation": {"runs": runs, "warmup": 2},
        "prune": {
            "amount": amount,
            "structured": structured,
            "criterion": "l1",
            "scope": "global",
            "modules": ["Conv2d", "Linear"],
            "exclude": None,
            "finetune": finetune,
        },
    }
    if input_shape:
        spec["input_shape"] = input_shape
    output = workdir / f"out-{structured}-{amount}-{bool(finetune)}.pt"
    report = compress(model_path, spec, output, data_path=data_path)
    return {"report": report, "output": output}


def row(model: str, structured: bool, amount: float, finetuned: bool, result: dict, accuracy: float | None) -> dict:
    report = result["report"]
    return {
        "model": model,
        "kind": "structured" if structured else "unstructured",
        "amount": amount,
        "finetuned": finetuned,
        "parameters_ratio": report["parameters"]["after"] / report["parameters"]["before"],
        "macs_ratio": report["details"]["macs"]["after"] / max(report["details"]["macs"]["before"], 1),
        "bytes": report["size"]["bytes_after"],
        "bytes_ratio": report["size"]["ratio"],
        "deflate_ratio": report["size"]["deflate_bytes_after"] / report["size"]["bytes_before"],
        "latency_ratio": report["latency"]["ratio"],
        "latency_batch": report["latency"]["batch_shape"],
        "test_accuracy": accuracy,
    }


def main() -> None:
    parser = arguments(__doc__, "prune")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    args = parser.parse_args()
    prepare(args)
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        import torchvision

        torch.manual_seed(0)
        resnet = save_scripted(torchvision.models.resnet18(weights=None), workdir / "resnet18.pt")
        for structured, amount in CONFIGS:
            result = run(resnet, structured, amount, args.runs, [8, 3, 224, 224], None, None, workdir)
            rows.append(row("resnet18", structured, amount, False, result, None))
            _print(rows[-1])

        splits = digits_splits()
        torch.manual_seed(0)
        teacher = train_classifier(DigitsCNN(), splits["x_train"], splits["y_train"], epochs=15)
        digits = save_scripted(teacher, workdir / "digits.pt")
        np.savez(workdir / "train.npz", inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
        baseline = test_accuracy(teacher, splits["x_test"], splits["y_test"])
        rows.append(
            {
                "model": "digits-cnn",
                "kind": "original",
                "amount": 0.0,
                "finetuned": False,
                "parameters_ratio": 1.0,
                "macs_ratio": 1.0,
                "bytes": digits.stat().st_size,
                "bytes_ratio": 1.0,
                "deflate_ratio": None,
                "latency_ratio": 1.0,
                "latency_batch": None,
                "test_accuracy": baseline,
            }
        )
        _print(rows[-1])
        finetune = {"epochs": args.finetune_epochs, "lr": 1e-3, "batch_size": 64, "seed": 0}
        for structured, amount in CONFIGS:
            for tuned in (None, finetune):
                result = run(digits, structured, amount, args.runs, None, workdir / "train.npz", tuned, workdir)
                pruned = torch.jit.load(str(result["output"]))
                accuracy = test_accuracy(pruned, splits["x_test"], splits["y_test"])
                rows.append(row("digits-cnn", structured, amount, tuned is not None, result, accuracy))
                _print(rows[-1])

    write_results(
        args,
        {
            "machine": machine(args, runs=args.runs, statistic="median latency", finetune_epochs=args.finetune_epochs),
            "results": rows,
        },
    )


_HEADER_PRINTED = False


def _print(entry: dict) -> None:
    global _HEADER_PRINTED
    if not _HEADER_PRINTED:
        print(
            f"{'model':11} {'kind':12} {'amount':>6} {'ft':>3} {'params':>7} {'MACs':>6} {'bytes':>6} "
            f"{'deflate':>7} {'latency':>7} {'test acc':>8}"
        )
        _HEADER_PRINTED = True
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print(
        f"{entry['model']:11} {entry['kind']:12} {entry['amount']:6.2f} {'yes' if entry['finetuned'] else 'no':>3} "
        f"{fmt(entry['parameters_ratio']):>7} {fmt(entry['macs_ratio']):>6} {fmt(entry['bytes_ratio']):>6} "
        f"{fmt(entry['deflate_ratio']):>7} {fmt(entry['latency_ratio']):>7} {fmt(entry['test_accuracy'], 4):>8}",
        flush=True,
    )


if __name__ == "__main__":
    main()
