"""Benchmark of the two formats: the same models compressed as TorchScript (.pt) and as torch.export programs (.pt2).

    .venv/bin/python bench/export.py [--runs 5] [--threads 2] [--out bench/results/export.json]

For each model and format, the job's own engine run (``workers.compression.pipeline.compress``,
the file saved and loaded back as the service returns it): size ratio, median eager latency of
the float upload and of the result in the same run, and cosine similarity of the outputs.
Runtime: eager only (torch.compile and AOTInductor are not measured yet). Prints a table, writes JSON.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.spec import parse_spec  # noqa: E402
from tests.exported_archives import save_exported  # noqa: E402
from tests.models import LinearTransformer, save_scripted, transformer_encoder  # noqa: E402  (the shared model zoo)
from workers.compression.pipeline import compress  # noqa: E402


def models() -> list[tuple[str, nn.Module, list[int]]]:
    torch.manual_seed(0)
    return [
        ("linear-transformer (2x d256)", LinearTransformer(width=256, blocks=2), [4, 16, 256]),
        ("nn.TransformerEncoder (2x d256)", transformer_encoder(width=256, layers=2), [4, 16, 256]),
    ]


def bench_one(name: str, model: nn.Module, shape: list[int], method: dict, runs: int, folder: Path) -> list[dict]:
    model = model.eval()
    rows = []
    uploads = {"torchscript": save_scripted(model, folder / "model.pt"),
               "pt2": save_exported(model, torch.randn(*shape), folder / "model.pt2")}
    for fmt, path in uploads.items():
        spec = parse_spec(json.dumps({**method, "input_shape": shape, "evaluation": {"runs": runs, "warmup": 2}}),
                          has_data=False, has_student=False)
        report = compress(path, spec, folder / f"out-{fmt}")
        rows.append({"model": name, "method": method["method"], "format": fmt, "bytes_before": report["size"]["bytes_before"],
                     "size_ratio": report["size"]["ratio"], "latency_before_ms": report["latency"]["before_ms"],
                     "latency_after_ms": report["latency"]["after_ms"], "latency_ratio": report["latency"]["ratio"],
                     "runtime": "eager", "cosine": report["fidelity"]["cosine_similarity"]})
        print(f"{name:34} {method['method']:9} {fmt:12} {rows[-1]['bytes_before'] / 1e6:7.1f} MB "
              f"{rows[-1]['size_ratio']:7.3f}x {rows[-1]['latency_before_ms']:9.2f} {rows[-1]['latency_after_ms']:9.2f} "
              f"{rows[-1]['latency_ratio']:7.2f}x {rows[-1]['cosine']:9.5f}", flush=True)
    return rows


def main() -> None:
    parser = arguments(__doc__, "export")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    prepare(args)
    print(f"{'model':34} {'method':9} {'format':12} {'float':>10} {'size':>8} {'float ms':>9} {'after ms':>9} "
          f"{'latency':>8} {'cosine':>9}")
    rows = []
    methods = [{"method": "quantize"}, {"method": "prune", "prune": {"amount": 0.5}}]
    with tempfile.TemporaryDirectory() as folder:
        for name, model, shape in models():
            for method in methods:
                rows += bench_one(name, model, shape, method, args.runs, Path(folder))
    write_results(args, {"machine": machine(args), "rows": rows})


if __name__ == "__main__":
    main()
