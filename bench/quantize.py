"""Benchmark of quantization: ModelPress's engine against torch's own, measured in the same run.

    .venv/bin/python bench/quantize.py [--runs 30] [--threads 2] [--only dynamic|static] [--out bench/results/quantize.json]

Static rows (int8 weights and activations): the engine's result beside torch's graph-mode
quantize_jit of the same file and FX static quantization of the nn.Module (same calibration
batches, x86 default qconfig), and PT2E (x86 Inductor quantizer + torch.compile) where it runs;
NNCF/OpenVINO is reported as not installed unless the `nncf` and `openvino` packages import.
Dynamic rows:

For each model: file size, median latency and output fidelity of
- float: the scripted model as a user would upload it;
- modelpress: the engine's result (saved and loaded back, as the service returns it);
- eager baseline: torch.ao.quantization.quantize_dynamic on the original nn.Module, run eagerly.
Prints a table and writes JSON.
"""
from __future__ import annotations

import copy
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
from workers.compression.inputs import Dataset  # noqa: E402
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


STATIC_SPEC = {"mode": "static", "dtype": "qint8", "modules": ["Conv1d", "Conv2d", "Conv3d", "Linear"], "exclude": [],
               "per_channel": True, "observer": "histogram", "reduce_range": True, "calibration_batches": 4,
               "min_cosine": 0.99}


def static_models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    import torchvision

    rows = []
    for arch in ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None)
        model.train()
        with torch.no_grad():  # BatchNorm statistics that are not the identity
            for _ in range(3):
                model(torch.randn(8, 3, 224, 224))
        rows.append((arch, model.eval(), (8, 3, 224, 224)))
    return rows


def bench_static(name: str, model: nn.Module, shape: tuple[int, ...], runs: int,
                 data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict:
    """One static row; ``data`` = (calibration inputs, test inputs, test labels, fresh inputs) for a trained model."""
    from torch.ao.quantization import get_default_qconfig, get_default_qconfig_mapping, quantize_jit
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = model.eval()
    float_bytes = saved_bytes(torch.jit.script(model))
    scripted = torch.jit.load(io.BytesIO(float_bytes))
    generator = torch.Generator().manual_seed(1)
    if data is None:
        calibration = torch.randn(4 * 32, *shape[1:], generator=generator)
        fresh = [torch.randn(*shape, generator=generator) for _ in range(8)]  # 64 inputs never calibrated on
    else:
        calibration, fresh = data[0], list(data[3].split(shape[0]))
    batches = list(calibration.split(32))
    batch = fresh[0]
    with torch.no_grad():
        reference = [model(x) for x in fresh]

    variants: dict[str, object] = {}
    ours, details = quantize(torch.jit.load(io.BytesIO(float_bytes)), STATIC_SPEC, Dataset(inputs=calibration), None)
    variants["modelpress"] = ours
    variants["quantize_jit"] = quantize_jit(torch.jit.load(io.BytesIO(float_bytes)), {"": get_default_qconfig("x86")},
                                            lambda m, bs: [m(b) for b in bs], [batches])
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (batch,))
    with torch.no_grad():
        for b in batches:
            prepared(b)
    variants["fx"] = convert_fx(prepared)
    variants["pt2e_compile"] = _pt2e(model, batch, batches)
    row = {"model": name, "input_shape": list(shape), "bytes": {"float": len(float_bytes)}, "latency_ms": {},
           "cosine": {}, "top1_agreement": {}, "errors": {}, "fallback": [f["module"] for f in details["fallback"]]}
    row["latency_ms"]["float"] = median_latency_ms(scripted, batch, runs=runs, warmup=2)
    for key, variant in variants.items():
        if isinstance(variant, str):
            row["errors"][key] = variant
            continue
        if isinstance(variant, torch.jit.ScriptModule):
            payload = saved_bytes(variant)
            row["bytes"][key] = len(payload)
            variant = torch.jit.load(io.BytesIO(payload))  # what a user downloads and loads
        with torch.no_grad():
            outputs = [variant(x) for x in fresh]
        fidelity = output_fidelity(reference, outputs)
        row["cosine"][key], row["top1_agreement"][key] = fidelity["cosine_similarity"], fidelity["top1_agreement"]
        row["latency_ms"][key] = median_latency_ms(variant, batch, runs=runs, warmup=2)
        if data is not None:
            with torch.no_grad():
                row.setdefault("accuracy", {})[key] = float((variant(data[1]).argmax(1) == data[2]).float().mean())
    if data is not None:
        with torch.no_grad():
            row["accuracy"]["float"] = float((model(data[1]).argmax(1) == data[2]).float().mean())
    row["size_ratio"] = {k: v / len(float_bytes) for k, v in row["bytes"].items() if k != "float"}
    row["latency_ratio"] = {k: v / row["latency_ms"]["float"] for k, v in row["latency_ms"].items() if k != "float"}
    if "quantize_jit" in row["latency_ms"]:
        row["modelpress_vs_quantize_jit_latency"] = row["latency_ms"]["modelpress"] / row["latency_ms"]["quantize_jit"]
    row["errors"]["nncf_openvino"] = _nncf_note()
    return row


def _pt2e(model: nn.Module, batch: torch.Tensor, batches: list[torch.Tensor]) -> object:
    """PT2E with the x86 Inductor quantizer, compiled; a string says why it did not run."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq  # type: ignore[import-not-found]
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # type: ignore[import-not-found]
    except ImportError:
        try:
            import torch.ao.quantization.quantizer.x86_inductor_quantizer as xiq
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        except ImportError as error:
            return f"not available: {error}"
    try:
        exported = torch.export.export(copy.deepcopy(model), (batch,), strict=True).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for b in batches:
                prepared(b)
        return torch.compile(convert_pt2e(prepared))
    except Exception as error:  # export or compile failures are results too
        return f"failed: {type(error).__name__}: {str(error)[:160]}"


def _nncf_note() -> str | None:
    try:
        import nncf  # type: ignore[import-not-found]  # noqa: F401
        import openvino  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return "not installed (pip install nncf openvino to add this baseline)"
    return "installed but not wired into this benchmark yet"


def digits_row(runs: int) -> dict:
    from tests.models import DigitsCNN, digits_splits, train_classifier

    torch.manual_seed(0)
    splits = digits_splits()
    model = train_classifier(DigitsCNN(), splits["x_train"], splits["y_train"], epochs=15)
    data = (splits["x_train"][:128], splits["x_test"], splits["y_test"], splits["x_test"][:64])
    return bench_static("digits CNN (trained)", model, (8, 1, 8, 8), runs, data)


def print_static(rows: list[dict]) -> None:
    keys = ("modelpress", "quantize_jit", "fx", "pt2e_compile")
    print(f"{'static model':22} " + " ".join(f"{k + ' size/lat/cos':>34}" for k in keys) + f" {'mp/jit':>7}")
    for row in rows:
        cells = []
        for key in keys:
            if key in row["latency_ratio"]:
                size = row["size_ratio"].get(key)
                cells.append(f"{_cell(size, 8, 3)}/{row['latency_ratio'][key]:7.3f}/{row['cosine'][key]:8.5f}"
                             f"{'' if 'accuracy' not in row else '/' + format(row['accuracy'][key], '.4f'):>9}")
            else:
                cells.append(f"{'-':>34}")
        print(f"{row['model']:22} " + " ".join(f"{c:>34}" for c in cells)
              + f" {_cell(row.get('modelpress_vs_quantize_jit_latency'), 7, 3)}")
        for key, error in row["errors"].items():
            if error:
                print(f"  {key}: {error}")


def main() -> None:
    parser = arguments(__doc__, "quantize")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", choices=["dynamic", "static"], default=None)
    parser.add_argument("--static-runs", type=int, default=5)
    args = parser.parse_args()
    prepare(args)

    static_rows = []
    if args.only != "dynamic":
        static_rows = [digits_row(args.static_runs)]
        static_rows += [bench_static(name, model, shape, args.static_runs) for name, model, shape in static_models()]
        print_static(static_rows)
    rows = [] if args.only == "static" else [bench_one(name, model, shape, args.runs) for name, model, shape in models()]
    facts = machine(args, runs=args.runs, static_runs=args.static_runs, statistic="median")

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
    write_results(args, {"machine": facts, "results": rows, "static": static_rows})


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


if __name__ == "__main__":
    main()
