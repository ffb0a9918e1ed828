"""Benchmark of distillation on scikit-learn's digits: width students against the same students from scratch.

    .venv/bin/python bench/distill.py [--epochs 20] [--threads 2] [--out bench/results/distill.json]

A teacher CNN is trained on the training split (75%). For each width (1/2, 1/3, 1/4, 1/8 of the
teacher's channels, so about 1/4, 1/9, 1/16, 1/64 of its parameters) the engine distills a student
with labels and without labels (soft targets alone), and the same architecture is trained from
scratch on labels with cross-entropy for as many epochs. Accuracy is on the held-out 25%.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.options import method_options  # noqa: E402
from tests.models import DigitsCNN, digits_splits, save_scripted, test_accuracy, train_classifier  # noqa: E402
from workers.engine.formats.torchscript import load_model  # noqa: E402
from workers.engine.inputs import load_dataset  # noqa: E402
from workers.engine.methods.prune.torchscript import prune  # noqa: E402
from workers.engine.methods.training import finetune  # noqa: E402
from workers.engine.run.pipeline import compress  # noqa: E402

WIDTHS = (0.5, 1 / 3, 0.25, 0.125)


def distill_spec(width: float, epochs: int) -> dict:
    return {
        "method": "distill",
        "seed": 0,
        "evaluation": {"runs": 5, "warmup": 2},
        "distill": {
            "student": {"source": "width", "width": width},
            "temperature": 4.0,
            "alpha": None,
            "epochs": epochs,
            "batch_size": 64,
            "lr": 3e-3,
            "optimizer": "adam",
            "val_fraction": 0.1,
            "early_stopping_patience": None,
            "seed": 0,
        },
    }


def scratch_student(
    teacher_path: Path, width: float, data_path: Path, epochs: int
) -> tuple[torch.jit.ScriptModule, float]:
    """The width student's architecture, re-initialised and trained on labels alone."""
    data = load_dataset(data_path)
    options = method_options("prune", {"amount": 1 - width, "structured": True, "modules": ["Conv2d", "Linear"]})
    student, _ = prune(load_model(teacher_path), options, data)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if parameter.dim() > 1:
                torch.nn.init.kaiming_uniform_(parameter, a=5**0.5)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
        for name, buffer in student.named_buffers():
            if name.endswith("running_mean"):
                buffer.zero_()
            elif name.endswith("running_var"):
                buffer.fill_(1.0)
    start = time.perf_counter()
    finetune(student, data, student, epochs=epochs, lr=3e-3, batch_size=64, seed=0)
    return student, time.perf_counter() - start


def main() -> None:
    parser = arguments(__doc__, "distill")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    prepare(args)
    splits = digits_splits()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        start = time.perf_counter()
        torch.manual_seed(0)  # the teacher's initial weights: reproducible figures
        teacher = train_classifier(DigitsCNN(), splits["x_train"], splits["y_train"], epochs=15)
        teacher_time = time.perf_counter() - start
        teacher_path = save_scripted(teacher, root / "teacher.pt")
        teacher_accuracy = test_accuracy(teacher, splits["x_test"], splits["y_test"])
        teacher_parameters = sum(p.numel() for p in teacher.parameters())
        np.savez(root / "labelled.npz", inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
        np.savez(root / "unlabelled.npz", inputs=splits["x_train"].numpy())
        print(
            f"teacher: test accuracy {teacher_accuracy:.4f}, {teacher_parameters} parameters, trained in {teacher_time:.1f} s"
        )
        print(
            f"{'width':>6} {'params':>7} {'distilled+labels':>16} {'distilled, no labels':>20} {'scratch+labels':>14} "
            f"{'% of teacher':>12} {'time (s)':>9}"
        )
        for width in WIDTHS:
            row = {"width": width}
            for name, data in (("labels", "labelled.npz"), ("no_labels", "unlabelled.npz")):
                began = time.perf_counter()
                report = compress(
                    teacher_path, distill_spec(width, args.epochs), root / f"s-{width}-{name}.pt", data_path=root / data
                )
                student = torch.jit.load(str(root / f"s-{width}-{name}.pt"))
                row[f"distilled_{name}"] = test_accuracy(student, splits["x_test"], splits["y_test"])
                row[f"time_{name}_s"] = time.perf_counter() - began
                row["parameters_ratio"] = report["parameters"]["after"] / report["parameters"]["before"]
            scratch, scratch_time = scratch_student(teacher_path, width, root / "labelled.npz", args.epochs)
            row["scratch_labels"] = test_accuracy(scratch, splits["x_test"], splits["y_test"])
            row["time_scratch_s"] = scratch_time
            row["of_teacher_labels"] = row["distilled_labels"] / teacher_accuracy
            row["of_teacher_no_labels"] = row["distilled_no_labels"] / teacher_accuracy
            rows.append(row)
            print(
                f"{width:6.3f} {row['parameters_ratio']:7.4f} {row['distilled_labels']:16.4f} "
                f"{row['distilled_no_labels']:20.4f} {row['scratch_labels']:14.4f} "
                f"{100 * row['of_teacher_labels']:7.1f}/{100 * row['of_teacher_no_labels']:4.1f} "
                f"{row['time_labels_s']:9.1f}",
                flush=True,
            )
    write_results(
        args,
        {
            "machine": machine(args, epochs=args.epochs),
            "students": rows,
            "teacher": {
                "test_accuracy": teacher_accuracy,
                "parameters": teacher_parameters,
                "train_time_s": teacher_time,
            },
        },
    )


if __name__ == "__main__":
    main()
