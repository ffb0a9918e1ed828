"""Compression that trains, on scikit-learn's digits, through the HTTP API: each training mode beside its
post-training counterpart with the same total epoch budget.

    .venv/bin/python bench/training.py [--rows qat,prune,structured,distill] [--out bench/results/training.json]

The digits are split 75/25 (stratified, seed 0). Models are trained here on the 75% and uploaded with
that split as the data file; the 25% is never seen by training, calibration or early stopping (the
service holds out part of the data file for its own choices): every accuracy in the table is on it.
A `make run` stack (its defaults, one worker) is started on free ports; every job is submitted,
polled and downloaded with the Python client, as a user would.

Rows (issue 27's acceptance):
- ``qat``: static PTQ vs QAT on models where PTQ might lose (per-tensor weights; a depthwise-separable
  CNN; a small transformer);
- ``prune``: unstructured 0.9, one shot + fine-tune vs a 4-step schedule with the same epochs;
- ``structured``: structured 0.7, l1 + fine-tune vs bn_scale and group_lasso regularized importance;
- ``distill``: a width-1/8 student, logits only vs logits + features vs a 2-step schedule.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torchao  # noqa: E402, F401  (an int8 .pt2 loads only after torchao registers its ops)

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.client import Client  # noqa: E402
from modelpress.stack import free_port  # noqa: E402
from tests.models import (  # noqa: E402
    DigitsCNN,
    SeparableDigitsCNN,
    digits_splits,
    save_scripted,
    test_accuracy,
    train_classifier,
)

EVALUATION = {"runs": 3, "warmup": 1}


class DigitsTransformer(nn.Module):
    """A small transformer on the digits: each of the 8 image rows is a token of 8 pixels."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.randn(8, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x[:, 0]) + self.position).mean(1))


class Service:
    """A `make run` stack on free ports, and a client to it."""

    def __init__(self, workdir: Path) -> None:
        port = free_port()
        env = {name: value for name, value in os.environ.items() if not name.startswith("MODELPRESS_")}
        env.pop("REDIS_URL", None)
        env.update(
            {
                "MODELPRESS_DATA_DIR": str(workdir / "data"),
                "MODELPRESS_PORT": str(port),
                "MODELPRESS_REDIS_PORT": str(free_port()),
            }
        )
        self.log = workdir / "stack.log"
        with open(self.log, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelpress.stack"],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.client = Client(f"http://127.0.0.1:{port}", timeout=600)
        deadline = time.monotonic() + 180
        while not self._ready():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the stack did not start; see {self.log}")
            time.sleep(1)

    def _ready(self) -> bool:
        try:
            return self.client.session.get(self.client.url + "/readyz", timeout=5).status_code == 200
        except Exception:
            return False

    def run(self, model: Path, spec: dict[str, Any], data: Path, out: Path) -> tuple[dict[str, Any], float]:
        """Submit, wait, download: the report and the job's wall time (started to finished)."""
        job = self.client.submit(model, spec, data=data)
        job = self.client.wait(job, timeout=3600)
        if job["state"] != "succeeded":
            raise RuntimeError(f"job {job['id']} {job['state']}: {job.get('error')}")
        self.client.download(job, out)
        return self.client.report(job), _seconds(job)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=120)


def _seconds(job: dict[str, Any]) -> float:
    from datetime import datetime

    started, finished = (
        datetime.fromisoformat(job[key].replace("Z", "+00:00")) for key in ("started_at", "finished_at")
    )
    return round((finished - started).total_seconds(), 1)


def _loaded(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    if path.suffix == ".pt2":
        return torch.export.load(path).module()
    return torch.jit.load(str(path))


def _accuracy(path: Path, splits: dict[str, torch.Tensor]) -> float:
    return round(test_accuracy(_loaded(path), splits["x_test"], splits["y_test"]), 4)


# ----------------------------------------------------------------------------- rows


def qat_rows(service: Service, splits: dict, workdir: Path, data: Path) -> list[dict[str, Any]]:
    """Static PTQ vs QAT (3 epochs) on three models, per-tensor weights for the CNNs."""
    rows = []
    # The transformer goes as a .pt2: torch's graph-mode static quantization (prepare_jit's observer pass)
    # crashes with a segmentation fault on the traced TorchScript of nn.TransformerEncoder (torch 2.14.1).
    cases = [
        ("separable CNN, per-tensor weights", SeparableDigitsCNN(16), {"per_channel": False}, ".pt"),
        ("CNN, per-tensor weights", DigitsCNN(16), {"per_channel": False}, ".pt"),
        ("transformer (2 layers, 32 wide), .pt2", DigitsTransformer(), {}, ".pt2"),
    ]
    for name, module, extra, suffix in cases:
        torch.manual_seed(0)
        model = train_classifier(module, splits["x_train"], splits["y_train"], epochs=20)
        path = _upload(model, workdir / f"qat-{len(rows)}{suffix}", splits)
        row = {"row": "qat", "model": name, "float": round(test_accuracy(model, splits["x_test"], splits["y_test"]), 4)}
        for label, quantize in (
            ("static_ptq", {"mode": "static", **extra}),
            ("qat", {"mode": "qat", "qat": {"epochs": 3}, **extra}),
        ):
            out = workdir / f"{path.stem}.{label}{suffix}"
            report, seconds = service.run(
                path, {"method": "quantize", "quantize": quantize, "evaluation": EVALUATION}, data, out
            )
            row[label] = _accuracy(out, splits)
            row[f"{label}_s"] = seconds
            if label == "qat":
                row["qat_returned"] = report["details"]["qat"]["returned"]
                row["qat_validation"] = report["details"]["qat"]["validation"]
        row["ptq_loss_points"] = round(100 * (row["float"] - row["static_ptq"]), 2)
        row["qat_loss_points"] = round(100 * (row["float"] - row["qat"]), 2)
        row["verdict"] = _qat_verdict(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _qat_verdict(row: dict[str, Any]) -> str:
    if row["ptq_loss_points"] >= 1:
        recovered = (row["qat"] - row["static_ptq"]) / (row["float"] - row["static_ptq"])
        return f"{'PASS' if recovered >= 0.5 else 'MISS'}: QAT recovers {recovered:.0%} of PTQ's loss"
    return (
        f"{'PASS' if row['qat_loss_points'] <= 0.3 else 'MISS'}: PTQ loses {row['ptq_loss_points']} points; QAT is "
        f"{row['qat_loss_points']} points from float (needs <= 0.3)"
    )


def _upload(model: nn.Module, path: Path, splits: dict) -> Path:
    if path.suffix == ".pt2":
        batch = torch.export.Dim("batch", max=4096)
        torch.export.save(
            torch.export.export(model.eval(), (splits["x_train"][:8],), dynamic_shapes=({0: batch},)), path
        )
        return path
    try:
        return save_scripted(model.eval(), path)
    except Exception:  # a module TorchScript cannot script (the transformer's fast path): traced, as users do
        traced = torch.jit.trace(model.eval(), splits["x_train"][:4], check_trace=False)
        traced.save(str(path))
        return path


def _teacher(splits: dict, workdir: Path) -> tuple[Path, float]:
    """The digits CNN (32 wide) trained on the training split, uploaded as TorchScript; its test accuracy."""
    path = workdir / "digits-cnn.pt"
    if not path.exists():
        torch.manual_seed(0)
        save_scripted(train_classifier(DigitsCNN(32), splits["x_train"], splits["y_train"], epochs=15), path)
    return path, _accuracy(path, splits)


def _compare(
    service: Service,
    splits: dict,
    workdir: Path,
    data: Path,
    row: str,
    method: str,
    variants: dict[str, dict[str, Any]],
    budget: int,
) -> list[dict[str, Any]]:
    """One job per variant of the same method on the same teacher; accuracy on the unseen split."""
    teacher, float_accuracy = _teacher(splits, workdir)
    rows = []
    for label, options in variants.items():
        out = workdir / f"{row}-{label}.pt"
        try:
            report, seconds = service.run(
                teacher, {"method": method, method: options, "evaluation": EVALUATION}, data, out
            )
        except RuntimeError as error:
            rows.append({"row": row, "variant": label, "epochs": budget, "failed": str(error)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append(
            {
                "row": row,
                "variant": label,
                "epochs": budget,
                "float": float_accuracy,
                "accuracy": _accuracy(out, splits),
                "parameters": report["parameters"],
                "parameter_ratio": round(report["parameters"]["after"] / report["parameters"]["before"], 4),
                "sparsity": report["details"].get("sparsity"),
                "job_s": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def prune_rows(service: Service, splits: dict, workdir: Path, data: Path) -> list[dict[str, Any]]:
    """Unstructured 0.9: one shot + 6 epochs of fine-tuning vs 4 steps (cubic) within the same 6 epochs."""
    finetune = {"epochs": 6, "lr": 1e-3}
    return _compare(
        service,
        splits,
        workdir,
        data,
        "prune",
        "prune",
        {
            "one shot + fine-tune": {"amount": 0.9, "finetune": finetune},
            "4-step schedule": {"amount": 0.9, "finetune": finetune, "schedule": {"steps": 4, "curve": "cubic"}},
        },
        budget=6,
    )


def structured_rows(service: Service, splits: dict, workdir: Path, data: Path) -> list[dict[str, Any]]:
    """Structured 0.7: l1 + 6 epochs of fine-tuning vs bn_scale / group_lasso (3 epochs regularized + 3)."""
    return _compare(
        service,
        splits,
        workdir,
        data,
        "structured",
        "prune",
        {
            "l1 + fine-tune": {"amount": 0.7, "structured": True, "finetune": {"epochs": 6}},
            "bn_scale": {
                "amount": 0.7,
                "structured": True,
                "importance": "bn_scale",
                "regularize": {"epochs": 3},
                "finetune": {"epochs": 3},
            },
            "group_lasso": {
                "amount": 0.7,
                "structured": True,
                "importance": "group_lasso",
                "regularize": {"epochs": 3},
                "finetune": {"epochs": 3},
            },
        },
        budget=6,
    )


def distill_rows(service: Service, splits: dict, workdir: Path, data: Path) -> list[dict[str, Any]]:
    """A width-1/8 student, 20 epochs: logits only vs logits + features vs a 2-step schedule."""
    base = {"student": {"from": "width", "width": 0.125}, "epochs": 20, "lr": 3e-3, "seed": 0}
    return _compare(
        service,
        splits,
        workdir,
        data,
        "distill",
        "distill",
        {
            "logits": base,
            "logits + features": {**base, "features": {}},
            "2-step schedule": {**base, "schedule": {"steps": 2}},
        },
        budget=20,
    )


ROWS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "qat": qat_rows,
    "prune": prune_rows,
    "structured": structured_rows,
    "distill": distill_rows,
}


def main() -> None:
    parser = arguments(__doc__, "training")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    args = parser.parse_args()
    prepare(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    splits = digits_splits(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-training-") as directory:
        workdir = Path(directory)
        data = workdir / "digits-train.npz"
        np.savez(data, inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
        service = Service(workdir)
        try:
            for name in args.rows.split(","):
                rows += ROWS[name](service, splits, workdir, data)
                _write(args, rows)
        finally:
            service.stop()
    _table(rows)
    _write(args, rows)


def _write(args: Any, rows: list[dict[str, Any]]) -> None:
    write_results(
        args,
        {
            "machine": machine(
                args,
                data="scikit-learn digits, 75/25 stratified split, seed 0",
                service="make run defaults, one worker, through the HTTP API",
            ),
            "rows": rows,
        },
    )


def _table(rows: list[dict[str, Any]]) -> None:
    qat = [row for row in rows if row["row"] == "qat"]
    if qat:
        print("\n| model | float | static PTQ | QAT (3 epochs) | returned | job s (PTQ / QAT) | verdict |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in qat:
            print(
                f"| {row['model']} | {row['float']:.4f} | {row['static_ptq']:.4f} | {row['qat']:.4f} | "
                f"{row['qat_returned']} | {row['static_ptq_s']} / {row['qat_s']} | {row['verdict']} |"
            )
    others = [row for row in rows if row["row"] != "qat"]
    if others:
        print("\n| row | variant | epochs | float | accuracy | parameters after / before | sparsity | job s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in others:
            if "failed" in row:
                print(f"| {row['row']} | {row['variant']} | {row['epochs']} | failed: {row['failed']} | | | | |")
                continue
            print(
                f"| {row['row']} | {row['variant']} | {row['epochs']} | {row['float']:.4f} | {row['accuracy']:.4f} | "
                f"{row['parameter_ratio']} | {row['sparsity'] if row['sparsity'] is not None else ''} | "
                f"{row['job_s']} |"
            )


if __name__ == "__main__":
    main()
