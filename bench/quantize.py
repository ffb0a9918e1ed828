"""Benchmark of dynamic quantization: ModelPress's engine against eager quantize_dynamic, same run.

    .venv/bin/python bench/quantize.py [--runs 30] [--threads 2] [--out bench/results/quantize.json]

For each model: file size, median latency and output fidelity of
- float: the scripted model as a user would upload it;
- modelpress: the engine's result (saved and loaded back, as the service returns it);
- eager baseline: torch.ao.quantization.quantize_dynamic on the original nn.Module, run eagerly.
Prints a table and writes JSON.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from tests.models import LinearTransformer, Recurrent, transformer_encoder  # noqa: E402  (the shared model zoo)
from workers.compression.measure import median_latency_ms, output_fidelity  # noqa: E402
from workers.compression.quantize import quantize  # noqa: E402

SPEC = {"mode": "dynamic", "dtype": "qint8", "modules": ["Linear", "LSTM", "GRU"], "exclude": [], "per_channel": True}


def models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    import torchvision

    torch.manual_seed(0)
    return [
        ("linear-transformer (6x d512)", LinearTransformer(width=512, blocks=6), (8, 64, 512)),
        ("nn.TransformerEncoder (6x d512)", transformer_encoder(width=512, layers=6), (8, 64, 512)),
        ("LSTM+GRU (2x256 + 256)", Recurrent(features=128, hidden=256), (8, 50, 128)),
        ("resnet18 (torchvision)", torchvision.models.resnet18(weights=None), (8, 3, 224, 224)),
    ]


def saved_bytes(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def bench_one(name: str, model: nn.Module, shape: tuple[int, ...], runs: int) -> dict:
    model = model.eval()
    scripted = torch.jit.script(model)
    float_bytes = saved_bytes(scripted)
    scripted = torch.jit.load(io.BytesIO(float_bytes))
    batch = torch.randn(*shape)
    with torch.no_grad():
        reference = [scripted(batch)]

    compressed, details = quantize(scripted, SPEC)
    ours_bytes = saved_bytes(compressed)
    ours = torch.jit.load(io.BytesIO(ours_bytes))
    with torch.no_grad():
        ours_out = [ours(batch)]

    eager = torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)
    try:
        eager_bytes = len(saved_bytes(torch.jit.script(eager)))
    except Exception:  # not every eager-quantized module scripts; fall back to its state_dict
        buffer = io.BytesIO()
        torch.save(eager.state_dict(), buffer)
        eager_bytes = buffer.getbuffer().nbytes
    eager_error = None
    try:
        with torch.no_grad():
            eager_out = [eager(batch)]
    except Exception as error:  # eager quantize_dynamic breaks nn.TransformerEncoder's fast-path checks
        eager_error, eager_out = f"{type(error).__name__}: {error}", None

    latency = {
        "float": median_latency_ms(scripted, batch, runs=runs, warmup=3),
        "modelpress": median_latency_ms(ours, batch, runs=runs, warmup=3),
        "eager_baseline": median_latency_ms(eager, batch, runs=runs, warmup=3) if eager_out else None,
    }
    return {
        "model": name,
        "input_shape": list(shape),
        "bytes": {"float": float_bytes.__len__(), "modelpress": len(ours_bytes), "eager_baseline": eager_bytes},
        "size_ratio": {"modelpress": len(ours_bytes) / len(float_bytes), "eager_baseline": eager_bytes / len(float_bytes)},
        "latency_ms": latency,
        "latency_ratio": {"modelpress": latency["modelpress"] / latency["float"],
                          "eager_baseline": _ratio(latency["eager_baseline"], latency["float"])},
        "modelpress_vs_eager_latency": _ratio(latency["modelpress"], latency["eager_baseline"]),
        "fidelity": {"modelpress": output_fidelity(reference, ours_out),
                     "eager_baseline": output_fidelity(reference, eager_out) if eager_out else None},
        "eager_baseline_error": eager_error,
        "kernels": details.get("counts", {}),
    }


def main() -> None:
    parser = arguments(__doc__, "quantize")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    prepare(args)

    rows = [bench_one(name, model, shape, args.runs) for name, model, shape in models()]
    facts = machine(args, runs=args.runs, statistic="median")

    header = f"{'model':32} {'size mp':>8} {'size eager':>10} {'lat mp':>7} {'lat eager':>9} {'mp/eager':>8} {'cos mp':>8} {'cos eager':>9} {'top1 mp':>7}"
    print(header)
    for row in rows:
        top1 = row["fidelity"]["modelpress"]["top1_agreement"]
        eager_fidelity = row["fidelity"]["eager_baseline"]
        print(f"{row['model']:32} {row['size_ratio']['modelpress']:8.3f} {row['size_ratio']['eager_baseline']:10.3f} "
              f"{row['latency_ratio']['modelpress']:7.3f} {_cell(row['latency_ratio']['eager_baseline'], 9, 3)} "
              f"{_cell(row['modelpress_vs_eager_latency'], 8, 3)} {row['fidelity']['modelpress']['cosine_similarity']:8.5f} "
              f"{_cell(eager_fidelity and eager_fidelity['cosine_similarity'], 9, 5)} {_cell(top1, 7, 3)}")
        if row["eager_baseline_error"]:
            print(f"  eager baseline failed: {row['eager_baseline_error'][:120]}")
    write_results(args, {"machine": facts, "results": rows})


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


if __name__ == "__main__":
    main()
