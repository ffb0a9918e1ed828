"""Benchmark of the two formats: the same models compressed as TorchScript (.pt) and as torch.export programs (.pt2).

    .venv/bin/python bench/export.py [--cases transformer,resnet18,encoder] [--runtimes eager,compile]
                                     [--runs 10] [--threads 2] [--out bench/results/export.json]

For each case and format, the job's own engine run (``workers.engine.run.pipeline.compress``,
the file saved and loaded back as the service returns it): size ratio, median latency of the
float upload and of the result in the same run and under the same runtime, and cosine similarity
of the outputs. TorchScript runs eagerly only; a .pt2 is timed under each runtime asked for
(``evaluation.runtime``: eager = ``ExportedProgram.module()``, compile = ``torch.compile``,
aoti = an AOTInductor package; compile and aoti need g++). Prints a table, writes JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, interleaved_medians, machine, prepare, raise_priority, write_results  # noqa: E402
from modelpress.formats import model_format  # noqa: E402
from modelpress.spec import parse_spec  # noqa: E402
from tests.exported_archives import save_exported  # noqa: E402
from tests.models import LinearTransformer, save_scripted, transformer_encoder  # noqa: E402  (the shared model zoo)
from workers.engine.errors import CompressionError  # noqa: E402
from workers.engine.formats.registry import FORMATS  # noqa: E402
from workers.engine.run.pipeline import compress  # noqa: E402


def _resnet18() -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=1000).train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity (no pretrained weights here)
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224))
    return model.eval()


def cases() -> dict[str, tuple]:
    """name -> (model factory, input shape, methods)."""
    dynamic = {"method": "quantize"}
    return {
        "transformer": (lambda: LinearTransformer(width=512, blocks=4), [8, 32, 512], [dynamic]),
        "encoder": (lambda: transformer_encoder(width=256, layers=2), [4, 16, 256], [dynamic]),
        "resnet18": (
            _resnet18,
            [8, 3, 224, 224],
            [
                {"method": "quantize", "quantize": {"mode": "static"}},
                {"method": "prune", "prune": {"amount": 0.5, "structured": True}},
            ],
        ),
    }


def bench_case(
    name: str, factory, shape: list[int], methods: list[dict], runtimes: list[str], runs: int, folder: Path
) -> list[dict]:
    torch.manual_seed(0)
    model = factory().eval()
    uploads = {
        "torchscript": save_scripted(model, folder / f"{name}.pt"),
        "pt2": save_exported(model, torch.randn(*shape), folder / f"{name}.pt2"),
    }
    rows = []
    for method in methods:
        for fmt, path in uploads.items():
            # TorchScript runs in its own interpreter; a pruned float program's speed shows eagerly.
            for runtime in runtimes if fmt == "pt2" and method["method"] == "quantize" else ["eager"]:
                spec = parse_spec(
                    json.dumps(
                        {**method, "input_shape": shape, "evaluation": {"runs": runs, "warmup": 3, "runtime": runtime}}
                    ),
                    has_data=False,
                    has_student=False,
                )
                label = method["method"] + (
                    "" if method["method"] != "quantize" else "-" + method.get("quantize", {}).get("mode", "dynamic")
                )
                if method.get("prune", {}).get("structured"):
                    label += "-structured"
                row = {
                    "model": name,
                    "method": label,
                    "format": fmt,
                    "runtime": runtime,
                    "bytes_before": path.stat().st_size,
                }
                started = time.perf_counter()
                try:
                    report = compress(path, spec, folder / f"out-{name}-{fmt}")
                except CompressionError as error:
                    row["error"] = str(error)[:200]
                    print(f"{name:12} {label:20} {fmt:12} {runtime:8} failed: {row['error']}", flush=True)
                    rows.append(row)
                    continue
                # The job times the float upload, then the result; on a shared machine a burst of load
                # lands on one of them. Timed again here in alternating rounds, under the same runtime.
                medians = interleaved_runtime_medians(path, folder / f"out-{name}-{fmt}", runtime, shape, runs)
                row.update(
                    interleaved_float_ms=round(medians["float"], 3),
                    interleaved_after_ms=round(medians["after"], 3),
                    interleaved_ratio=round(medians["after"] / medians["float"], 3),
                )
                row.update(
                    size_ratio=report["size"]["ratio"],
                    parameter_ratio=round(report["parameters"]["after"] / report["parameters"]["before"], 4),
                    latency_before_ms=report["latency"]["before_ms"],
                    latency_after_ms=report["latency"]["after_ms"],
                    latency_ratio=report["latency"]["ratio"],
                    cosine=report["fidelity"]["cosine_similarity"],
                    job_seconds=round(time.perf_counter() - started, 1),
                )
                rows.append(row)
                print(
                    f"{name:12} {label:20} {fmt:12} {runtime:8} {row['bytes_before'] / 1e6:7.1f} MB "
                    f"{row['size_ratio']:7.3f}x {row['parameter_ratio']:7.3f}x {row['latency_before_ms']:9.2f} "
                    f"{row['latency_after_ms']:9.2f} {row['latency_ratio']:7.2f}x {row['interleaved_ratio']:7.2f}x "
                    f"{row['cosine']:9.5f}",
                    flush=True,
                )
    return rows


def interleaved_runtime_medians(
    upload: Path, result: Path, runtime: str, shape: list[int], runs: int
) -> dict[str, float]:
    """Median ms of the float upload and of the result, both loaded and compiled as the job does,
    timed in alternating rounds (``interleaved_medians``)."""
    batch = (torch.randn(*shape),)
    models = {}
    for label, path in (("float", upload), ("after", result)):
        form = FORMATS[model_format(path)]
        models[label] = form.timed(form.runnable(form.load(path)), runtime, batch)
    with torch.no_grad():
        return interleaved_medians(models, batch, runs=runs)


def main() -> None:
    parser = arguments(__doc__, "export")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cases", default="transformer,resnet18,encoder")
    parser.add_argument("--runtimes", default="eager,compile")
    args = parser.parse_args()
    prepare(args)
    priority = raise_priority()
    print(
        f"{'model':12} {'method':20} {'format':12} {'runtime':8} {'float':>10} {'size':>8} {'params':>8} "
        f"{'float ms':>9} {'after ms':>9} {'latency':>8} {'alt.':>8} {'cosine':>9}"
    )
    rows = []
    chosen = cases()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases.split(","):
            factory, shape, methods = chosen[name]
            rows += bench_case(name, factory, shape, methods, args.runtimes.split(","), args.runs, Path(folder))
    write_results(args, {"machine": machine(args, priority=priority), "rows": rows})


if __name__ == "__main__":
    main()
