"""Spread of the suite's accuracy figures over seeds and CPU kernels: where the tests' bounds come from.

    .venv/bin/python bench/spread.py [--seeds 5] [--variants native,portable] [--out bench/results/spread.json]

The same seed trains a different model on another CPU (other vector kernels, other summation
orders), so a bound tuned on one machine can fail on the next. This script reruns, for each seed
and each kernel variant, what the engine tests train on scikit-learn's digits: the teacher, a
width-1/3 student distilled with and without labels, the same student trained from scratch (the
baseline distillation must beat), and unstructured / structured pruning with fine-tuning. Each
(variant, seed) runs in its own process: ``native`` uses the best kernels this CPU has;
``portable`` forces torch's scalar kernels, oneDNN's SSE4.1 code and MKL's compatible mode, a
stand-in for a CPU with other vector units. The table prints the worst, median and best of each
figure; the tests set their floors below the worst with a margin.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, write_results  # noqa: E402

VARIANTS = {
    "native": {},
    "portable": {
        "ATEN_CPU_CAPABILITY": "default",
        "DNNL_MAX_CPU_ISA": "SSE41",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
}
FIGURES = (
    "teacher",
    "distilled_labels",
    "distilled_no_labels",
    "scratch_labels",
    "unstructured_0.8_finetuned",
    "structured_0.5_finetuned",
    "structured_0.5_self_distilled",
)


def main() -> None:
    parser = arguments(__doc__, "spread")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse_hidden())
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one_seed(int(args.one[1]), args.threads)))
        return
    runs = []
    print(f"{'variant':>9} {'seed':>4} " + " ".join(f"{name[:24]:>24}" for name in FIGURES), flush=True)
    for variant in args.variants.split(","):
        for seed in range(args.seeds):
            env = {**os.environ, **VARIANTS[variant], "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(
                [sys.executable, __file__, "--one", variant, str(seed), "--threads", str(args.threads)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = {"variant": variant, "seed": seed, **json.loads(out.stdout.strip().splitlines()[-1])}
            runs.append(row)
            print(f"{variant:>9} {seed:>4} " + " ".join(f"{row[name]:24.4f}" for name in FIGURES), flush=True)
    summary = {}
    for name in FIGURES:
        values = [row[name] for row in runs]
        summary[name] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    relative = [row["distilled_labels"] / row["teacher"] for row in runs]
    summary["distilled_labels_of_teacher"] = {
        "min": min(relative),
        "median": statistics.median(relative),
        "max": max(relative),
    }
    print(f"\n{'figure':>32} {'worst':>8} {'median':>8} {'best':>8}")
    for name, stats in summary.items():
        print(f"{name:>32} {stats['min']:8.4f} {stats['median']:8.4f} {stats['max']:8.4f}")
    write_results(
        args, {"machine": machine(args, seeds=args.seeds, variants=args.variants), "runs": runs, "summary": summary}
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def _one_seed(seed: int, threads: int) -> dict[str, float]:
    """One seed's figures, with the specs the engine tests use (tests/engine/test_distill.py, test_prune.py)."""
    import warnings

    import numpy as np
    import torch

    from bench.distill import distill_spec, scratch_student
    from tests.models import DigitsCNN, digits_splits, save_scripted, test_accuracy, train_classifier
    from workers.engine.run.pipeline import compress

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    splits = digits_splits()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        torch.manual_seed(seed)
        teacher = train_classifier(DigitsCNN(), splits["x_train"], splits["y_train"], epochs=15, seed=seed)
        teacher_path = save_scripted(teacher, root / "teacher.pt")
        figures["teacher"] = test_accuracy(teacher, splits["x_test"], splits["y_test"])
        np.savez(root / "labelled.npz", inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
        np.savez(root / "unlabelled.npz", inputs=splits["x_train"].numpy())

        def accuracy_of(spec: dict, data: str, name: str) -> float:
            compress(teacher_path, spec, root / name, data_path=root / data)
            return test_accuracy(torch.jit.load(str(root / name)), splits["x_test"], splits["y_test"])

        spec = distill_spec(0.33, 15)
        spec["distill"]["seed"] = seed
        figures["distilled_labels"] = accuracy_of(spec, "labelled.npz", "d1.pt")
        figures["distilled_no_labels"] = accuracy_of(spec, "unlabelled.npz", "d2.pt")
        scratch, _ = scratch_student(teacher_path, 0.33, root / "labelled.npz", 15)
        figures["scratch_labels"] = test_accuracy(scratch, splits["x_test"], splits["y_test"])
        for name, amount, structured, epochs, data in (
            ("unstructured_0.8_finetuned", 0.8, False, 4, "labelled.npz"),
            ("structured_0.5_finetuned", 0.5, True, 6, "labelled.npz"),
            ("structured_0.5_self_distilled", 0.5, True, 4, "unlabelled.npz"),
        ):
            spec = {
                "method": "prune",
                "seed": 0,
                "evaluation": {"runs": 2, "warmup": 1},
                "prune": {
                    "amount": amount,
                    "structured": structured,
                    "criterion": "l1",
                    "scope": "global",
                    "modules": ["Conv2d", "Linear"],
                    "exclude": None,
                    "finetune": {"epochs": epochs, "lr": 1e-3, "batch_size": 64, "seed": seed},
                },
            }
            figures[name] = accuracy_of(spec, data, f"{name}.pt")
    return figures


if __name__ == "__main__":
    main()
