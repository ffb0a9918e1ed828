"""Benchmark of quantization: ModelPress's engine against torch's own, measured in the same run.

    .venv/bin/python bench/quantize.py [--runs 30] [--static-runs 15] [--threads 2] [--only dynamic|static]
        [--static-models digits,resnet18,...] [--out bench/results/quantize.json]

Static rows (int8 weights and activations): the engine's result beside torch's graph-mode
quantize_jit of the same file and FX static quantization of the nn.Module (same calibration
batches, x86 default qconfig), PT2E (torchao's x86 Inductor quantizer + torch.compile) and NNCF
to OpenVINO (`pip install .[bench]` adds both; a row says why one did not run). Latencies of one
row are timed interleaved (one call of each variant per round), medians, with this process
reniced to -10 (nice and autogroup) because the machine may be shared.
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
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, interleaved_medians, machine, prepare, raise_priority, write_results  # noqa: E402
from modelpress.options import method_options  # noqa: E402
from tests.models import LinearTransformer, Recurrent, transformer_encoder  # noqa: E402  (the shared model zoo)
from workers.engine.inputs import Dataset  # noqa: E402
from workers.engine.measure import output_fidelity  # noqa: E402
from workers.engine.methods.quantize.torchscript import quantize  # noqa: E402

SPEC = {
    "mode": "dynamic",
    "dtype": "qint8",
    "modules": ["Linear", "LSTM", "GRU", "MultiheadAttention"],
    "exclude": [],
    "per_channel": True,
}


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

    compressed, details = quantize(scripted, method_options("quantize", SPEC))
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

    timed = {"float": scripted, "modelpress": ours, **({"eager_baseline": eager} if eager_out else {})}
    latency = {"eager_baseline": None, **interleaved_medians(timed, (batch,), runs=runs, warmup=3)}
    return {
        "model": name,
        "input_shape": list(shape),
        "bytes": {"float": float_bytes.__len__(), "modelpress": len(ours_bytes), "eager_baseline": eager_bytes},
        "size_ratio": {
            "modelpress": len(ours_bytes) / len(float_bytes),
            "eager_baseline": eager_bytes / len(float_bytes),
        },
        "latency_ms": latency,
        "latency_ratio": {
            "modelpress": latency["modelpress"] / latency["float"],
            "eager_baseline": _ratio(latency["eager_baseline"], latency["float"]),
        },
        "modelpress_vs_eager_latency": _ratio(latency["modelpress"], latency["eager_baseline"]),
        "fidelity": {
            "modelpress": output_fidelity(reference, ours_out),
            "eager_baseline": output_fidelity(reference, eager_out) if eager_out else None,
        },
        "eager_baseline_error": eager_error,
        "kernels": details.get("counts", {}),
    }


STATIC_SPEC = {
    "mode": "static",
    "dtype": "qint8",
    "modules": ["Conv1d", "Conv2d", "Conv3d", "Linear"],
    "exclude": [],
    "per_channel": True,
    "observer": "histogram",
    "reduce_range": True,
    "calibration_batches": 4,
    "min_cosine": 0.99,
}


STATIC_ARCHITECTURES = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")


def static_model(arch: str) -> tuple[str, nn.Module, tuple[int, ...]]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224))
    return arch, model.eval(), (8, 3, 224, 224)


class _Timed:
    """A variant as the table sees it: something to call on a batch, and its file size if it has one."""

    def __init__(self, call: object, size: int | None = None) -> None:
        self.call, self.size = call, size


def bench_static(
    name: str,
    model: nn.Module,
    shape: tuple[int, ...],
    runs: int,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """One static row; ``data`` = (calibration inputs, test inputs, test labels, fresh inputs) for a trained model."""
    from torch.ao.quantization import get_default_qconfig, get_default_qconfig_mapping, quantize_jit
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = model.eval()
    float_bytes = saved_bytes(torch.jit.script(model))
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

    variants: dict[str, _Timed | str] = {"float": _Timed(torch.jit.load(io.BytesIO(float_bytes)), len(float_bytes))}
    ours, details = quantize(
        torch.jit.load(io.BytesIO(float_bytes)),
        method_options("quantize", STATIC_SPEC),
        Dataset(inputs=calibration),
        None,
    )
    variants["modelpress"] = _reloaded(ours)
    if "onednn" in torch.backends.quantized.supported_engines:
        # Packed int8 weights are repacked for the engine active when the file is loaded.
        variants["modelpress_onednn"] = _reloaded(ours, engine="onednn")
    try:
        jit = quantize_jit(
            torch.jit.load(io.BytesIO(float_bytes)),
            {"": get_default_qconfig("x86")},
            lambda m, bs: [m(b) for b in bs],
            [batches],
        )
        variants["quantize_jit"] = _reloaded(jit)
    except Exception as error:  # torch's own pass fails on some models (efficientnet's stochastic depth)
        variants["quantize_jit"] = f"failed: {type(error).__name__}: {str(error)[:160]}"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (batch,))
    with torch.no_grad():
        for b in batches:
            prepared(b)
    variants["fx"] = _Timed(convert_fx(prepared))
    variants["pt2e_compile"] = _pt2e(model, batch, batches)
    variants["nncf_openvino"] = _nncf_openvino(model, batch, calibration)

    row = {
        "model": name,
        "input_shape": list(shape),
        "bytes": {},
        "latency_ms": {},
        "cosine": {},
        "top1_agreement": {},
        "errors": {},
        "fallback": [f["module"] for f in details["fallback"]],
        "cosine_all_layers_int8": details["cosine_all_layers_int8"],
    }
    ready = {}
    for key, variant in variants.items():
        if isinstance(variant, str):
            row["errors"][key] = variant
            continue
        try:
            with torch.no_grad():
                outputs = [variant.call(x) for x in fresh]  # also the first calls (compilation, optimisation)
                accuracy = None if data is None else float((variant.call(data[1]).argmax(1) == data[2]).float().mean())
        except Exception as error:  # a baseline that fails on these inputs is a result too
            row["errors"][key] = f"failed: {type(error).__name__}: {str(error)[:160]}"
            continue
        ready[key] = variant.call
        if variant.size is not None:
            row["bytes"][key] = variant.size
        if key != "float":
            fidelity = output_fidelity(reference, outputs)
            row["cosine"][key], row["top1_agreement"][key] = fidelity["cosine_similarity"], fidelity["top1_agreement"]
        if accuracy is not None:
            row.setdefault("accuracy", {})[key] = accuracy
    row["latency_ms"] = interleaved_medians(ready, (batch,), runs=runs, warmup=2)
    row["size_ratio"] = {k: v / len(float_bytes) for k, v in row["bytes"].items() if k != "float"}
    row["latency_ratio"] = {k: v / row["latency_ms"]["float"] for k, v in row["latency_ms"].items() if k != "float"}
    if "quantize_jit" in row["latency_ms"] and "modelpress" in row["latency_ms"]:
        row["modelpress_vs_quantize_jit_latency"] = row["latency_ms"]["modelpress"] / row["latency_ms"]["quantize_jit"]
    return row


def _reloaded(module: torch.jit.ScriptModule, engine: str | None = None) -> _Timed:
    """What a user downloads and loads with plain ``torch.jit.load`` (under ``engine`` if given)."""
    payload = saved_bytes(module)
    previous = torch.backends.quantized.engine
    try:
        if engine:
            torch.backends.quantized.engine = engine
        return _Timed(torch.jit.load(io.BytesIO(payload)), len(payload))
    finally:
        torch.backends.quantized.engine = previous


def _pt2e(model: nn.Module, batch: torch.Tensor, batches: list[torch.Tensor]) -> _Timed | str:
    """PT2E with torchao's x86 Inductor quantizer, compiled with freezing; a string says why it did not run."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq  # type: ignore[import-not-found]
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # type: ignore[import-not-found]
    except ImportError as error:
        return f"not installed ({error}; pip install .[bench])"
    try:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # what the x86 Inductor quantization recipe asks for
        batch_dim = ({0: torch.export.Dim("batch")},)  # test splits are scored in one call
        exported = torch.export.export(copy.deepcopy(model), (batch,), dynamic_shapes=batch_dim, strict=True).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for b in batches:
                prepared(b)
        return _Timed(torch.compile(convert_pt2e(prepared)))
    except Exception as error:  # export or compile failures are results too
        return f"failed: {type(error).__name__}: {str(error)[:160]}"


class _OpenVinoModel:
    def __init__(self, compiled: object) -> None:
        self.compiled = compiled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.numpy())[0])


def _nncf_openvino(model: nn.Module, batch: torch.Tensor, calibration: torch.Tensor) -> _Timed | str:
    """NNCF post-training quantization of the model converted to OpenVINO, same calibration rows."""
    try:
        import nncf  # type: ignore[import-not-found]
        import openvino as ov  # type: ignore[import-not-found]
    except ImportError as error:
        return f"not installed ({error}; pip install .[bench])"
    import tempfile

    try:
        converted = ov.convert_model(copy.deepcopy(model), example_input=batch)
        rows = list(calibration.split(batch.shape[0]))
        quantized = nncf.quantize(converted, nncf.Dataset(rows, lambda x: x.numpy()), subset_size=calibration.shape[0])
        with tempfile.TemporaryDirectory() as folder:
            ov.save_model(quantized, f"{folder}/model.xml", compress_to_fp16=False)
            size = sum(path.stat().st_size for path in Path(folder).iterdir())
        threads = torch.get_num_threads()
        compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": threads})
        return _Timed(_OpenVinoModel(compiled), size)
    except Exception as error:
        return f"failed: {type(error).__name__}: {str(error)[:160]}"


def digits_row(runs: int) -> dict:
    from tests.models import DigitsCNN, digits_splits, train_classifier

    torch.manual_seed(0)
    splits = digits_splits()
    model = train_classifier(DigitsCNN(), splits["x_train"], splits["y_train"], epochs=15)
    data = (splits["x_train"][:128], splits["x_test"], splits["y_test"], splits["x_test"][:64])
    return bench_static("digits CNN (trained)", model, (8, 1, 8, 8), runs, data)


STATIC_VARIANTS = ("modelpress", "modelpress_onednn", "quantize_jit", "fx", "pt2e_compile", "nncf_openvino")


def print_static(rows: list[dict]) -> None:
    print(f"{'static model':22} {'variant':18} {'size':>6} {'latency':>8} {'cosine':>8} {'top1':>5} {'accuracy':>8}")
    for row in rows:
        print(
            f"{row['model']:22} {'float':18} {1:6.3f} {row['latency_ms']['float']:6.1f}ms {'':>8} {'':>5} "
            f"{_cell(row.get('accuracy', {}).get('float'), 8, 4)}"
        )
        for key in STATIC_VARIANTS:
            if key in row["errors"]:
                print(f"{'':22} {key:18} {row['errors'][key]}")
            elif key in row["latency_ratio"]:
                print(
                    f"{'':22} {key:18} {_cell(row['size_ratio'].get(key), 6, 3)} {row['latency_ratio'][key]:8.3f} "
                    f"{row['cosine'][key]:8.5f} {row['top1_agreement'][key]:5.2f} "
                    f"{_cell(row.get('accuracy', {}).get(key), 8, 4)}"
                )
        print(f"{'':22} modelpress / quantize_jit latency {_cell(row.get('modelpress_vs_quantize_jit_latency'), 6, 3)}")


def main() -> None:
    parser = arguments(__doc__, "quantize")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", choices=["dynamic", "static"], default=None)
    parser.add_argument("--static-runs", type=int, default=15)
    parser.add_argument(
        "--static-models",
        default="digits," + ",".join(STATIC_ARCHITECTURES),
        help="comma-separated: digits and torchvision architectures",
    )
    parser.add_argument(
        "--dynamic-models",
        default="",
        help="comma-separated words; only dynamic rows whose name contains one (default: all)",
    )
    args = parser.parse_args()
    prepare(args)
    priority = raise_priority()
    load_before = list(os.getloadavg())

    static_rows: list[dict] = []
    rows: list[dict] = []

    def save() -> None:
        facts = machine(
            args,
            runs=args.runs,
            static_runs=args.static_runs,
            statistic="median",
            priority=priority,
            load_average_at_start=load_before,
        )
        write_results(args, {"machine": facts, "results": rows, "static": static_rows})

    if args.only != "dynamic":
        for name in args.static_models.split(","):
            static_rows.append(
                digits_row(args.static_runs)
                if name == "digits"
                else bench_static(*static_model(name), args.static_runs)
            )
            print_static(static_rows[-1:])
            save()
    if args.only != "static":
        wanted = [word for word in args.dynamic_models.split(",") if word]
        for name, model, shape in models():
            if not wanted or any(word in name for word in wanted):
                rows.append(bench_one(name, model, shape, args.runs))
            save()

    header = f"{'model':32} {'size mp':>8} {'size eager':>10} {'lat mp':>7} {'lat eager':>9} {'mp/eager':>8} {'cos mp':>8} {'cos eager':>9} {'top1 mp':>7}"
    print(header)
    for row in rows:
        top1 = row["fidelity"]["modelpress"]["top1_agreement"]
        eager_fidelity = row["fidelity"]["eager_baseline"]
        print(
            f"{row['model']:32} {row['size_ratio']['modelpress']:8.3f} {row['size_ratio']['eager_baseline']:10.3f} "
            f"{row['latency_ratio']['modelpress']:7.3f} {_cell(row['latency_ratio']['eager_baseline'], 9, 3)} "
            f"{_cell(row['modelpress_vs_eager_latency'], 8, 3)} {row['fidelity']['modelpress']['cosine_similarity']:8.5f} "
            f"{_cell(eager_fidelity and eager_fidelity['cosine_similarity'], 9, 5)} {_cell(top1, 7, 3)}"
        )
        if row["eager_baseline_error"]:
            print(f"  eager baseline failed: {row['eager_baseline_error'][:120]}")
    save()


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


if __name__ == "__main__":
    main()
