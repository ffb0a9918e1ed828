"""Acceptance benchmark of issue 25 (deploy anywhere): the export targets of a job, each timed on its own runtime.

    .venv/bin/python bench/targets.py [--runs 15] [--eval-runs 10] [--calibration-batches 3] [--settle-ms 50]
        [--rows resnet18,mobilenet_v2,bert,resnet50_pruned] [--threads 2] [--out bench/results/targets.json]

Each row runs the engine as a job does (``workers.engine.run.pipeline.compress`` on a TorchScript upload
and an ``.npz`` data file, ``targets`` in the spec), then loads every artifact with its target module
(``registry.target_module(name)``: ``load``, ``run``) and, in the same process, times it interleaved
(``common.interleaved_medians``'s pattern: one call of each variant per round, medians, batch 8, with
an untimed 50 ms pause before each call so no runtime's spinning threads slow the next; see
``settled_medians``) beside the
float TorchScript upload, the job's main (TorchScript) result and the peers done by hand:

- resnet18 static int8, targets onnx, openvino, executorch; peer: NNCF -> OpenVINO by hand
  (``torch.onnx.export`` of the float model, ``openvino.convert_model``, ``nncf.quantize`` on the same
  calibration rows, compiled for the CPU with ``INFERENCE_NUM_THREADS`` = ``--threads``);
- mobilenet_v2 static int8, target onnx: latency and top-1 agreement on held-out inputs;
- a BERT-style encoder (``transformers.BertModel``, 4 layers, hidden 256, random weights, input ids and
  attention mask in, last hidden state out, ``torch.jit.trace``) dynamic int8, target onnx; peer: the
  float model exported by the same ONNX target module (no int8), on onnxruntime;
- resnet50 pruned structured (amount 0.5), float, every target: parameter elements of each artifact
  (ONNX initializers, OpenVINO IR constants; ExecuTorch: ``.pte`` bytes) against the unpruned model
  exported by the same target modules.

Data: no real images or text here. Calibration rows and held-out rows are random normal images
(token ids uniform, attention masks with random padding), from different seeds; fidelity is measured
on the held-out rows, never on the calibration rows. Torchvision models have random weights with
BatchNorm statistics from three train-mode passes (``tests.models.settle_batchnorm``).
Prints a table (each measured value beside its acceptance bound, PASS/MISS) and writes JSON.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, interleaved_medians, machine, prepare, raise_priority, write_results  # noqa: E402
from bench.quantize import _cell  # noqa: E402
from modelpress.formats import TORCHSCRIPT  # noqa: E402
from modelpress.spec import parse_spec  # noqa: E402
from tests.models import save_scripted, settle_batchnorm  # noqa: E402  (the shared model zoo)
from workers.engine.measure import output_fidelity  # noqa: E402
from workers.engine.run.pipeline import compress  # noqa: E402
from workers.engine.targets.common import TargetRequest  # noqa: E402
from workers.engine.targets.registry import target_module  # noqa: E402

ALL_TARGETS = ["onnx", "openvino", "executorch"]
BATCH = 8
HELD_OUT_BATCHES = 8  # 64 held-out rows for fidelity
CALIBRATION_ROWS = 32  # per batch, as the job's own static int8 (workers.engine.run.targets)
ROWS = ("resnet18", "mobilenet_v2", "bert", "resnet50_pruned")


# ---------------------------------------------------------------------------- models and data


def torchvision_model(arch: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return settle_batchnorm(getattr(torchvision.models, arch)(weights=None), (BATCH, 3, 224, 224), seed=0)


class BertEncoder(nn.Module):
    """``transformers.BertModel`` taking token ids and an attention mask, returning the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=8000,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=512,
            attn_implementation="eager",
        )
        self.bert = BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def images(rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(rows, 3, 224, 224, generator=torch.Generator().manual_seed(seed)),)


def tokens(rows: int, seed: int, length: int = 128, vocab: int = 8000) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    kept = torch.randint(length // 2, length + 1, (rows, 1), generator=generator)  # random padding per row
    mask = (torch.arange(length).unsqueeze(0) < kept).long()
    return ids, mask


def write_data(path: Path, inputs: tuple[torch.Tensor, ...]) -> Path:
    """The job's data file: ``inputs`` for one input, ``input_0, input_1, ...`` for several."""
    if len(inputs) == 1:
        np.savez(path, inputs=inputs[0].numpy())
    else:
        np.savez(path, **{f"input_{i}": t.numpy() for i, t in enumerate(inputs)})
    return path


def batches(inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    return list(zip(*(t.split(BATCH) for t in inputs)))


# ---------------------------------------------------------------------------- the job and its artifacts


def run_job(model: Path, data: Path, out: Path, spec: dict[str, Any], eval_runs: int) -> tuple[dict, float]:
    spec = {**spec, "evaluation": {"runs": eval_runs, "warmup": 2}}
    start = time.perf_counter()
    report = compress(model, parse_spec(spec, has_data=True), out, data_path=data)
    return report, time.perf_counter() - start


def load_artifacts(report: dict, out: Path) -> tuple[dict[str, tuple[Any, Any]], dict[str, str]]:
    """name -> (target module, loaded artifact) for every target that succeeded; name -> reason for the rest."""
    loaded, failed = {}, {}
    for name, entry in report.get("targets", {}).items():
        if entry.get("status") != "succeeded":
            failed[name] = entry.get("reason", entry.get("status", "?"))
            continue
        module = target_module(name)
        loaded[name] = (module, module.load(out.parent / entry["file"]))
    return loaded, failed


def runtime_threads(name: str, loaded: Any) -> str:
    """How many threads a target module's session uses: the modules set none (runtime defaults)."""
    if name == "onnx":
        threads = loaded.get_session_options().intra_op_num_threads
        return (
            f"intra_op_num_threads={threads}"
            + (" (onnxruntime default: physical cores)" if threads == 0 else "")
            + "; intra-op spinning left on (default)"
        )
    if name == "openvino":
        return (
            f"INFERENCE_NUM_THREADS={loaded.get_property('INFERENCE_NUM_THREADS')} (module sets none; plugin default)"
        )
    return "XNNPACK threadpool default (module sets none)"


def artifact_call(module: Any, loaded: Any, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    arrays = [t.numpy() for t in inputs]
    return lambda: module.run(loaded, arrays)


def torch_call(model: Any, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    return lambda: model(*inputs)


def held_out_fidelity(
    reference: list[torch.Tensor],
    call: Callable[[tuple[torch.Tensor, ...]], Any],
    held_out: list[tuple[torch.Tensor, ...]],
) -> dict[str, Any]:
    """Cosine and top-1 agreement of ``call``'s outputs against the float model's, on the held-out batches."""
    candidate = []
    for inputs in held_out:
        output = call(inputs)
        if isinstance(output, list):  # a target module's run: numpy arrays in order; the models here have one
            output = torch.from_numpy(output[0])
        candidate.append(output)
    fidelity = output_fidelity(reference, candidate)
    # output_fidelity's cosine is float32 over millions of elements: its rounding shows above 1 (1.00006
    # on the BERT row); the acceptance figure is the same cosine accumulated in float64.
    a = torch.cat([t.double().flatten() for t in reference])
    b = torch.cat([t.double().flatten() for t in candidate])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))
    return {
        "cosine_similarity": cosine,
        "cosine_float32": fidelity["cosine_similarity"],
        "top1_agreement": fidelity["top1_agreement"],
        "max_abs_error": fidelity["max_abs_error"],
    }


def settled_medians(
    models: dict[str, Callable[[], Any]], runs: int, settle_ms: float, warmup: int = 2
) -> dict[str, float]:
    """``common.interleaved_medians`` with an untimed pause of ``settle_ms`` before each timed call.

    onnxruntime's intra-op threads keep spinning on the cores after a run returns (its default,
    ``session.intra_op.allow_spinning``; the target module's session keeps it): on 2 cores the
    variant timed right after the ONNX artifact in a round ran about 1.5x slower (resnet18 int8
    OpenVINO: 65 ms after onnx, 41 ms elsewhere in the round; the same with NNCF's model in that
    slot). A 50 ms pause let every pool go idle and removed it. ``settle_ms`` 0: the plain helper."""
    if settle_ms <= 0:
        return interleaved_medians(models, (), runs=runs, warmup=warmup)
    timings: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model()
        for _ in range(runs):
            for name, model in models.items():
                time.sleep(settle_ms / 1000.0)
                start = time.perf_counter()
                model()
                timings[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in timings.items()}


def measure_variants(
    float_model: Any,
    variants: dict[str, tuple[Callable[[tuple], Any], Callable[[], Any]]],
    held_out: list[tuple[torch.Tensor, ...]],
    runs: int,
    settle_ms: float,
) -> dict[str, Any]:
    """Fidelity on the held-out rows and interleaved median latency (held_out[0]) of every variant.

    ``variants``: name -> (call on a batch, call timed). The float model is timed as ``float``."""
    with torch.no_grad():
        reference = [float_model(*inputs) for inputs in held_out]
        fidelity = {name: held_out_fidelity(reference, call, held_out) for name, (call, _) in variants.items()}
    timed = {"float": torch_call(float_model, held_out[0]), **{name: t for name, (_, t) in variants.items()}}
    latency = settled_medians(timed, runs, settle_ms)
    return {
        "latency_ms": latency,
        "latency_ratio": {name: value / latency["float"] for name, value in latency.items() if name != "float"},
        "fidelity": fidelity,
        "float_classes_held_out": _distinct_classes(reference),
    }


def _distinct_classes(reference: list[torch.Tensor]) -> int | None:
    if not all(r.dim() == 2 and r.shape[1] > 1 for r in reference):
        return None
    return int(torch.cat([r.argmax(1) for r in reference]).unique().numel())


def artifact_variants(artifacts: dict[str, tuple[Any, Any]], timing_batch: tuple[torch.Tensor, ...]) -> dict:
    return {
        name: (
            lambda inputs, m=module, ld=loaded: m.run(ld, [t.numpy() for t in inputs]),
            artifact_call(module, loaded, timing_batch),
        )
        for name, (module, loaded) in artifacts.items()
    }


def main_result_variant(out: Path, timing_batch: tuple[torch.Tensor, ...]) -> dict:
    result = torch.jit.load(str(out))
    return {"job_torchscript": (lambda inputs: result(*inputs), torch_call(result, timing_batch))}


def job_summary(report: dict, seconds: float) -> dict[str, Any]:
    targets = {}
    for name, entry in report.get("targets", {}).items():
        targets[name] = {
            key: entry.get(key)
            for key in ("status", "reason", "file", "precision", "bytes", "latency_ms", "latency_ratio", "notes")
        }
        if entry.get("fidelity"):
            targets[name]["fidelity"] = {k: entry["fidelity"].get(k) for k in ("cosine_similarity", "top1_agreement")}
    return {
        "wall_s": round(seconds, 1),
        "size": report.get("size"),
        "parameters": report.get("parameters"),
        "latency": report.get("latency"),
        "fidelity_cosine": report.get("fidelity", {}).get("cosine_similarity"),
        "warnings": report.get("warnings"),
        "timings_s": report.get("timings_s"),
        "targets": targets,
    }


def check(row: dict, measure: str, value: float | None, bound: str, passed: bool | None) -> None:
    row["acceptance"].append(
        {
            "measure": measure,
            "value": value,
            "bound": bound,
            "verdict": "n/a" if passed is None else ("PASS" if passed else "MISS"),
        }
    )


# ---------------------------------------------------------------------------- rows


def static_row(arch: str, folder: Path, args: Any, targets: list[str], peer: bool) -> dict:
    """resnet18 / mobilenet_v2: static int8 job with ``targets``; everything timed interleaved with float."""
    model = torchvision_model(arch)
    upload = save_scripted(model, folder / f"{arch}.pt")
    calibration = images(CALIBRATION_ROWS * args.calibration_batches, seed=1)
    data = write_data(folder / f"{arch}.npz", calibration)
    held_out = batches(images(BATCH * HELD_OUT_BATCHES, seed=2))
    out = folder / f"{arch}_int8.pt"
    spec = {
        "method": "quantize",
        "quantize": {"mode": "static", "calibration_batches": args.calibration_batches},
        "targets": targets,
    }
    report, seconds = run_job(upload, data, out, spec, args.eval_runs)
    artifacts, failed = load_artifacts(report, out)
    variants = {**main_result_variant(out, held_out[0]), **artifact_variants(artifacts, held_out[0])}
    errors = {f"target {name}": reason for name, reason in failed.items()}
    peer_facts = {}
    if peer:
        made = nncf_openvino_by_hand(model, calibration, folder / f"{arch}_nncf")
        if isinstance(made, str):
            errors["nncf_openvino"] = made
        else:
            variants["nncf_openvino"] = (made[0], made[1](held_out[0]))
            peer_facts = made[2]
    measured = measure_variants(torch.jit.load(str(upload)), variants, held_out, args.runs, args.settle_ms)
    row = {
        "row": arch,
        "spec": spec,
        "calibration_rows": int(calibration[0].shape[0]),
        "held_out_rows": BATCH * HELD_OUT_BATCHES,
        "job": job_summary(report, seconds),
        "errors": errors,
        "runtime_threads": {name: runtime_threads(name, loaded) for name, (_, loaded) in artifacts.items()},
        "peer": peer_facts,
        **measured,
        "acceptance": [],
    }
    row["bytes"] = {name: report["targets"][name]["bytes"] for name in artifacts}
    row["bytes"]["float"] = report["size"]["bytes_before"]
    row["bytes"]["job_torchscript"] = report["size"]["bytes_after"]
    ratio, fidelity = measured["latency_ratio"], measured["fidelity"]
    if arch == "resnet18":
        present = [name for name in ALL_TARGETS if name in artifacts]
        fastest = min(present, key=lambda name: ratio[name]) if present else None
        row["fastest_artifact"] = fastest
        check(
            row,
            f"fastest artifact ({fastest}) latency / float TorchScript",
            ratio.get(fastest) if fastest else None,
            "<= 0.30",
            fastest is not None and ratio[fastest] <= 0.30,
        )
        peer_ratio = (
            measured["latency_ms"][fastest] / measured["latency_ms"]["nncf_openvino"]
            if fastest and "nncf_openvino" in measured["latency_ms"]
            else None
        )
        row["fastest_vs_nncf_openvino"] = peer_ratio
        check(
            row,
            f"fastest artifact ({fastest}) latency / NNCF->OpenVINO by hand",
            peer_ratio,
            "<= 1.05",
            peer_ratio is not None and peer_ratio <= 1.05,
        )
        cosine = fidelity[fastest]["cosine_similarity"] if fastest else None
        check(
            row,
            f"fastest artifact ({fastest}) cosine vs float (held-out)",
            cosine,
            ">= 0.998",
            cosine is not None and cosine >= 0.998,
        )
        for name in ALL_TARGETS:
            if name in artifacts and name != fastest:
                check(row, f"{name} latency / float TorchScript (info)", ratio[name], "-", None)
                check(row, f"{name} cosine vs float (info)", fidelity[name]["cosine_similarity"], "-", None)
            elif name not in artifacts:
                check(row, f"{name} artifact", None, "succeeds", False)
    else:
        present = "onnx" in artifacts
        check(
            row, "onnx int8 latency / float TorchScript", ratio.get("onnx"), "<= 0.5", present and ratio["onnx"] <= 0.5
        )
        top1 = fidelity["onnx"]["top1_agreement"] if present else None
        check(
            row,
            f"onnx int8 top-1 agreement (held-out; float picks {measured['float_classes_held_out']} "
            f"class(es) over {BATCH * HELD_OUT_BATCHES} rows)",
            top1,
            ">= 0.9",
            top1 is not None and top1 >= 0.9,
        )
        check(
            row,
            "onnx int8 cosine vs float (info)",
            fidelity["onnx"]["cosine_similarity"] if present else None,
            "-",
            None,
        )
    return row


def nncf_openvino_by_hand(
    model: nn.Module, calibration: tuple[torch.Tensor, ...], folder: Path
) -> tuple[Callable, Callable, dict] | str:
    """What a user does without ModelPress: ONNX from torch, OpenVINO's converter, NNCF on the same
    calibration rows (in the job's 32-row batches), compiled for the CPU with the bench's thread count.
    Returns (call on a batch, timed call for a batch, facts), or why it failed."""
    try:
        import nncf
        import openvino as ov
    except ImportError as error:
        return f"not installed ({error})"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        onnx_path = folder / "float.onnx"
        started = time.perf_counter()
        example = calibration[0][:BATCH]
        torch.onnx.export(
            model.eval(),
            (example,),
            str(onnx_path),
            dynamo=False,
            opset_version=17,
            input_names=["input_0"],
            output_names=["output_0"],
            dynamic_axes={"input_0": {0: "batch"}, "output_0": {0: "batch"}},
        )
        converted = ov.convert_model(str(onnx_path))
        rows = [t.numpy() for t in calibration[0].split(CALIBRATION_ROWS)]
        quantized = nncf.quantize(converted, nncf.Dataset(rows), subset_size=len(rows))
        ov.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
        size = sum(path.stat().st_size for path in folder.iterdir() if path.suffix in (".xml", ".bin"))
        threads = torch.get_num_threads()
        compiled = ov.Core().compile_model(
            quantized, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        )
        facts = {
            "route": "torch.onnx.export (TorchScript exporter, opset 17) -> openvino.convert_model -> "
            "nncf.quantize (defaults) -> compile_model CPU",
            "bytes": size,
            "calibration_items": len(rows),
            "threads": threads,
            "seconds": round(time.perf_counter() - started, 1),
        }

        def call(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return torch.from_numpy(np.array(compiled(inputs[0].numpy())[0], copy=True))

        def timed(inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
            array = inputs[0].numpy()
            return lambda: compiled(array)

        return call, timed, facts
    except Exception as error:  # a failing peer is a result too
        return f"failed: {type(error).__name__}: {str(error)[:200]}"


def bert_row(folder: Path, args: Any) -> dict:
    """Dynamic int8 of a traced BERT-style encoder, target onnx; float ONNX from the same target module."""
    model = BertEncoder().eval()
    calibration = tokens(64, seed=1)
    held_out = batches(tokens(BATCH * HELD_OUT_BATCHES, seed=2))
    with torch.no_grad():
        traced = torch.jit.trace(model, held_out[0])
    upload = folder / "bert.pt"
    traced.save(str(upload))
    data = write_data(folder / "bert.npz", calibration)
    out = folder / "bert_int8.pt"
    spec = {"method": "quantize", "quantize": {"mode": "dynamic"}, "targets": ["onnx"]}
    report, seconds = run_job(upload, data, out, spec, args.eval_runs)
    artifacts, failed = load_artifacts(report, out)
    errors = {f"target {name}": reason for name, reason in failed.items()}
    variants = {**main_result_variant(out, held_out[0]), **artifact_variants(artifacts, held_out[0])}
    onnx = target_module("onnx")
    float_dir = folder / "bert_float_onnx"
    try:  # the peer: the float model through the same exporter, unquantized, on onnxruntime
        request = TargetRequest(model=torch.jit.load(str(upload)), format_name=TORCHSCRIPT, example=held_out[0])
        float_artifact = onnx.export(request, float_dir)
        float_loaded = onnx.load(float_artifact.path)
        variants["onnx_float"] = (
            lambda inputs: onnx.run(float_loaded, [t.numpy() for t in inputs]),
            artifact_call(onnx, float_loaded, held_out[0]),
        )
        float_onnx_bytes = float_artifact.bytes
    except Exception as error:
        errors["onnx_float"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
        float_onnx_bytes = None
    measured = measure_variants(torch.jit.load(str(upload)), variants, held_out, args.runs, args.settle_ms)
    float_bytes = report["size"]["bytes_before"]
    row = {
        "row": "bert",
        "model": "transformers BertModel: 4 layers, hidden 256, 4 heads, intermediate 1024, "
        "vocab 8000, sequence 128, random weights, traced; output last_hidden_state",
        "spec": spec,
        "held_out_rows": BATCH * HELD_OUT_BATCHES,
        "job": job_summary(report, seconds),
        "errors": errors,
        "runtime_threads": {name: runtime_threads(name, loaded) for name, (_, loaded) in artifacts.items()},
        "bytes": {
            "float": float_bytes,
            "job_torchscript": report["size"]["bytes_after"],
            "onnx_float": float_onnx_bytes,
            **{n: report["targets"][n]["bytes"] for n in artifacts},
        },
        **measured,
        "acceptance": [],
    }
    present = "onnx" in artifacts
    size_ratio = row["bytes"]["onnx"] / float_bytes if present else None
    row["onnx_size_ratio"] = size_ratio
    check(
        row,
        "onnx int8 bytes / float TorchScript bytes",
        size_ratio,
        "<= 0.30",
        size_ratio is not None and size_ratio <= 0.30,
    )
    cosine = measured["fidelity"]["onnx"]["cosine_similarity"] if present else None
    check(row, "onnx int8 cosine vs float (held-out)", cosine, ">= 0.999", cosine is not None and cosine >= 0.999)
    latency = measured["latency_ms"]
    vs_float = latency["onnx"] / latency["onnx_float"] if present and "onnx_float" in latency else None
    row["onnx_int8_vs_onnx_float_latency"] = vs_float
    check(
        row,
        "onnx int8 latency / float ONNX latency (onnxruntime)",
        vs_float,
        "< 1.0",
        vs_float is not None and vs_float < 1.0,
    )
    check(row, "onnx int8 latency / float TorchScript (info)", measured["latency_ratio"].get("onnx"), "-", None)
    return row


def pruned_row(folder: Path, args: Any) -> dict:
    """Structured-pruned resnet50 to every target: each artifact's stored elements against the unpruned
    model exported by the same target module (ONNX initializers, OpenVINO constants, ExecuTorch bytes)."""
    model = torchvision_model("resnet50")
    upload = save_scripted(model, folder / "resnet50.pt")
    data = write_data(folder / "resnet50.npz", images(32, seed=1))
    out = folder / "resnet50_pruned.pt"
    spec = {"method": "prune", "prune": {"amount": 0.5, "structured": True}, "targets": ALL_TARGETS}
    report, seconds = run_job(upload, data, out, spec, args.eval_runs)
    parameters = report["parameters"]
    torch_ratio = parameters["after"] / parameters["before"]
    row = {
        "row": "resnet50_pruned",
        "spec": spec,
        "job": job_summary(report, seconds),
        "errors": {},
        "torch_parameters": parameters,
        "torch_parameter_ratio": torch_ratio,
        "counts": {},
        "acceptance": [],
    }
    example = images(BATCH, seed=2)
    started = time.perf_counter()
    for name in ALL_TARGETS:
        entry = report["targets"].get(name, {})
        if entry.get("status") != "succeeded":
            row["errors"][name] = entry.get("reason", "missing")
            check(row, f"{name} artifact", None, "succeeds", False)
            continue
        pruned_path = out.parent / entry["file"]
        try:  # the unpruned float model through the same target module: the count to stay below
            request = TargetRequest(model=torch.jit.load(str(upload)), format_name=TORCHSCRIPT, example=example)
            unpruned = target_module(name).export(request, folder / f"resnet50_unpruned_{name}").path
        except Exception as error:
            row["errors"][f"{name} unpruned export"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            check(row, f"{name} unpruned export", None, "succeeds", False)
            continue
        unit, count = STORED_ELEMENTS[name]
        pruned_count, unpruned_count = count(pruned_path), count(unpruned)
        ratio = pruned_count / unpruned_count
        row["counts"][name] = {"unit": unit, "pruned": pruned_count, "unpruned": unpruned_count, "ratio": ratio}
        check(
            row,
            f"{name}: {unit}, pruned / unpruned ({pruned_count:,} / {unpruned_count:,})",
            ratio,
            f"<= {1.05 * torch_ratio:.3f} (1.05 x torch's {torch_ratio:.3f})",
            ratio <= 1.05 * torch_ratio,
        )
    row["unpruned_exports_s"] = round(time.perf_counter() - started, 1)
    return row


def onnx_elements(path: Path) -> int:
    """Elements of the ONNX file's initializers and Constant nodes' tensors."""
    import onnx

    graph = onnx.load(str(path)).graph
    total = sum(int(np.prod(tensor.dims)) for tensor in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            total += sum(int(np.prod(attr.t.dims)) for attr in node.attribute if attr.HasField("t"))
    return total


def openvino_elements(path: Path) -> int:
    """Elements of the IR's Const layers (read from model.xml in the target's zip)."""
    from xml.etree import ElementTree

    with zipfile.ZipFile(path) as archive:
        root = ElementTree.fromstring(archive.read("model.xml"))
    total = 0
    for layer in root.iter("layer"):
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None:
            shape = [int(d) for d in (data.get("shape") or "").split(",") if d.strip()]
            total += int(np.prod(shape)) if shape else 1
    return total


STORED_ELEMENTS: dict[str, tuple[str, Callable[[Path], int]]] = {
    "onnx": ("initializer elements", onnx_elements),
    "openvino": ("IR Const elements", openvino_elements),
    "executorch": (".pte bytes (weights not separable from Python)", lambda path: path.stat().st_size),
}


# ---------------------------------------------------------------------------- table


def print_row(row: dict) -> None:
    print(f"\n== {row['row']}  (job {row['job']['wall_s']} s)")
    for key, value in row.get("errors", {}).items():
        print(f"   error {key}: {value}")
    if "latency_ms" in row:
        print(f"   {'variant':18} {'latency':>10} {'vs float':>9} {'cosine':>9} {'top1':>6} {'bytes':>12}")
        for name, value in row["latency_ms"].items():
            fidelity = row["fidelity"].get(name, {})
            print(
                f"   {name:18} {value:8.1f}ms {_cell(row['latency_ratio'].get(name, 1.0), 9, 3)} "
                f"{_cell(fidelity.get('cosine_similarity'), 9, 5)} {_cell(fidelity.get('top1_agreement'), 6, 2)} "
                f"{row.get('bytes', {}).get(name) or '-':>12}"
            )
    for name, threads in row.get("runtime_threads", {}).items():
        print(f"   threads {name}: {threads}")
    for name, entry in row["job"]["targets"].items():
        print(
            f"   job report {name}: {entry['status']} {entry.get('precision') or ''} "
            f"latency_ratio={entry.get('latency_ratio')} cosine={(entry.get('fidelity') or {}).get('cosine_similarity')}"
        )


def print_table(rows: list[dict]) -> None:
    print(f"\n{'row':16} {'measure':78} {'value':>10} {'bound':>28} verdict")
    for row in rows:
        for item in row["acceptance"]:
            value = item["value"]
            shown = f"{value:10.4f}" if isinstance(value, float) else f"{'-' if value is None else value:>10}"
            print(f"{row['row']:16} {item['measure'][:78]:78} {shown} {item['bound']:>28} {item['verdict']}")


def main() -> None:
    parser = arguments(__doc__, "targets")
    parser.add_argument("--runs", type=int, default=15, help="interleaved timed rounds per row")
    parser.add_argument("--eval-runs", type=int, default=10, help="the job's evaluation.runs")
    parser.add_argument("--calibration-batches", type=int, default=3, help="static int8: batches of 32 rows")
    parser.add_argument(
        "--settle-ms",
        type=float,
        default=50.0,
        help="untimed pause before each timed call (0: common.interleaved_medians as is)",
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    args = parser.parse_args()
    prepare(args)
    priority = raise_priority()
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    rows: list[dict] = []

    def save() -> None:
        facts = machine(
            args,
            runs=args.runs,
            eval_runs=args.eval_runs,
            settle_ms=args.settle_ms,
            batch=BATCH,
            statistic="median",
            priority=priority,
            load_average_at_start=load_before,
            wall_s=round(time.perf_counter() - started, 1),
            onnxruntime=_version("onnxruntime"),
            openvino=_version("openvino"),
            nncf=_version("nncf"),
            executorch=_version("executorch"),
            data="random normal images / random token ids (no real data in this environment); "
            "fidelity on held-out rows of another seed",
        )
        write_results(args, {"machine": facts, "rows": rows})

    with tempfile.TemporaryDirectory(prefix="bench-targets-") as scratch:
        for name in args.rows.split(","):
            folder = Path(scratch) / name
            folder.mkdir()
            if name == "resnet18":
                rows.append(static_row("resnet18", folder, args, ALL_TARGETS, peer=True))
            elif name == "mobilenet_v2":
                rows.append(static_row("mobilenet_v2", folder, args, ["onnx"], peer=False))
            elif name == "bert":
                rows.append(bert_row(folder, args))
            elif name == "resnet50_pruned":
                rows.append(pruned_row(folder, args))
            else:
                raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
            print_row(rows[-1])
            save()
    print_table(rows)
    save()


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
