"""Acceptance benchmark of issue 26: GPT-2, BERT, ViT and a Llama-style model from `transformers`, next to Torch-Pruning.

    .venv/bin/python bench/transformers.py [--models gpt2,bert,vit,llama] [--formats torchscript,pt2]
        [--runs 30] [--eval-runs 10] [--threads 2] [--check] [--out bench/results/transformers.json]

Models: built from `transformers` configs with random weights (seed 0, no downloads): GPT-2
(``GPT2LMHeadModel``), BERT (``BertModel`` without the pooler, output ``last_hidden_state``), ViT
(``ViTForImageClassification``, 32x32 images, patch 8, 10 labels) and a Llama-style model
(``LlamaForCausalLM``, 4 key/value heads), each with 4 layers, hidden 256, 4 heads, intermediate
1024, vocabulary 8000 (text). Each is wrapped to take its documented inputs (``input_ids`` and
``attention_mask``, or ``pixel_values``) and return one tensor (``.logits`` or
``.last_hidden_state``), then uploaded two ways: ``torch.jit.trace`` of the wrapper (TorchScript)
and ``torch.export.export`` of the wrapper with a dynamic batch (``.pt2``). A model that fails to
export is a row that says so.

Jobs: the issue asks for these through the HTTP API; this bench calls the engine entry a worker
runs for a job (``workers.engine.run.pipeline.compress`` with ``parse_spec(spec)``), the same
code without the queue and the upload. Per model and upload: dynamic int8 (default modules:
Linear and its other spellings, and embeddings), structured prune at amount 0.3 (heads and MLP
width), the same with ``prune.hidden`` (job ``hidden``: the residual width, embeddings and norms
too; the peer's column belongs to the plain row, which prunes what the peer prunes) and
unstructured prune at amount 0.5. Every spec has ``seed`` 0, ``evaluation`` {runs: --eval-runs, warmup: 2} and
``inputs`` declaring int64 ids in [0, 8000) and an all-ones mask (or a float image), batch 2,
sequence 32.

Peer: Torch-Pruning 1.6.1 (``pip install .[bench]``) prunes the same ``nn.Module`` (a deep copy
taken before tracing) at the same amount: ``MetaPruner`` with ``num_heads`` for q/k/v,
``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio`` = ``pruning_ratio``
= 0.3, ``GroupMagnitudeImportance(p=2)``, local (not global) pruning, as its
``examples/transformers/prune_hf_*.py`` do. To prune heads and MLP width only, as ModelPress
does, the layers that write the residual stream (attention output and MLP output projections)
and the classifier / LM head are ignored; afterwards the attention modules' head counts are
updated as those examples do. Torch-Pruning has no pruner for ``transformers``' ``Conv1D``, so
GPT-2 has no peer; a peer that has not finished after --peer-limit seconds is given up (SIGALRM)
and its cell says where it was (on the Llama-style model Torch-Pruning's group search ran for over
16 minutes on this 2-core machine without finishing).

Measures: bytes ratio and cosine are the job report's (file bytes; cosine over the job's check
batches), with our own cosine on a batch of another seed next to it. Parameter ratios count
parameters only (no buffers) of the result loaded back (``torch.jit.load``, or the program's
``module()``), and of Torch-Pruning's module. Latency: the original upload, our result, the
original ``nn.Module`` and Torch-Pruning's module are timed interleaved in one loop
(``common.interleaved_medians``: one call of each per round, median of --runs rounds, batch 2,
torch threads --threads); each latency ratio is pruned / its own original.

Prints a markdown table with PASS/MISS per acceptance item and writes JSON. The exit status is 0;
with --check it is 1 when a non-timing acceptance item misses or a job fails (never because of a
latency).
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# This file's own folder comes off sys.path first: there, `import transformers` would find this file.
sys.path[:] = [str(ROOT)] + [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT / "bench"]

import transformers  # noqa: E402

from bench.common import arguments, interleaved_medians, machine, prepare, write_results  # noqa: E402
from modelpress.spec import parse_spec  # noqa: E402
from tests.models import PixelLogits, TextOutput  # noqa: E402
from workers.engine.formats.exported import load_program  # noqa: E402
from workers.engine.run.pipeline import compress  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB, LAYERS, HIDDEN, HEADS, INTERMEDIATE = 8000, 4, 256, 4, 1024
BATCH, SEQUENCE, IMAGE, PATCH = 2, 32, 32, 8
AMOUNT_STRUCTURED, AMOUNT_UNSTRUCTURED = 0.3, 0.5
FORMATS = ("torchscript", "pt2")
PEER_BOUND = {"bert", "vit"}  # the "within 0.10 of Torch-Pruning and at least as fast" rows
STRUCTURED = ("structured", "hidden")  # jobs that remove channels: heads and MLP width; hidden: the residual width too


# ---------------------------------------------------------------------------- models


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=INTERMEDIATE, vocab_size=VOCAB, n_positions=128
    )
    return TextOutput(transformers.GPT2LMHeadModel(config), "logits")


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return TextOutput(transformers.BertModel(config, add_pooling_layer=False), "last_hidden_state")


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=10,
    )
    return PixelLogits(transformers.ViTForImageClassification(config))


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return TextOutput(transformers.LlamaForCausalLM(config), "logits")


# name -> (builder, what it is)
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "gpt2": (gpt2, "GPT2LMHeadModel -> logits [2, 32, 8000] (lm_head tied to wte)"),
    "bert": (bert, "BertModel (no pooler) -> last_hidden_state [2, 32, 256]"),
    "vit": (vit, "ViTForImageClassification, 32x32, patch 8 -> logits [2, 10]"),
    "llama": (llama, "LlamaForCausalLM, 4 kv heads (no GQA), SwiGLU -> logits [2, 32, 8000]"),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def is_text(name: str) -> bool:
    return name != "vit"


def examples(name: str, seed: int, batch: int = BATCH) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    if not is_text(name):
        return (torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),)
    ids = torch.randint(0, VOCAB, (batch, SEQUENCE), generator=generator)
    return ids, torch.ones_like(ids)


def declared_inputs(name: str) -> list[dict[str, Any]]:
    """The spec's ``inputs``: what the job feeds the model (the tests' ``_spec``)."""
    if not is_text(name):
        return [{"shape": [BATCH, 3, IMAGE, IMAGE], "dtype": "float32"}]
    return [
        {"shape": [BATCH, SEQUENCE], "dtype": "int64", "low": 0, "high": VOCAB},
        {"shape": [BATCH, SEQUENCE], "dtype": "int64", "low": 1, "high": 2},
    ]


def upload(name: str, model: nn.Module, form: str, folder: Path) -> dict[str, Any]:
    """Save the model as a user would; returns {"path"} or {"error"} (and how it was exported)."""
    example = examples(name, seed=1)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            if form == "torchscript":
                path = folder / f"{name}.pt"
                torch.jit.trace(model, example, strict=False).save(str(path))
                return {
                    "path": path,
                    "how": "torch.jit.trace(strict=False)",
                    "seconds": round(time.perf_counter() - started, 1),
                }
            path = folder / f"{name}.pt2"
            batch = torch.export.Dim("batch", max=64)
            program = torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))
            torch.export.save(program, path)
            return {
                "path": path,
                "how": "torch.export.export, dynamic batch (max 64)",
                "seconds": round(time.perf_counter() - started, 1),
            }
    except Exception as error:
        return {"error": f"{type(error).__name__}: {_first_line(error)}"}


def load_result(form: str, path: Path) -> Callable[..., Any]:
    if form == "torchscript":
        return torch.jit.load(str(path))  # plain torch, as a user loads it
    return load_program(path).module()  # torch.export.load (and torchao's int8 ops registered)


# ---------------------------------------------------------------------------- jobs


def spec_for(name: str, job: str, eval_runs: int) -> dict[str, Any]:
    base = {"seed": 0, "evaluation": {"runs": eval_runs, "warmup": 2}, "inputs": declared_inputs(name)}
    if job == "int8":
        return {**base, "method": "quantize", "quantize": {"mode": "dynamic"}}
    if job in STRUCTURED:  # hidden: prune.hidden, the residual width (embeddings, norms) too
        prune = {"amount": AMOUNT_STRUCTURED, "structured": True, **({"hidden": True} if job == "hidden" else {})}
        return {**base, "method": "prune", "prune": prune}
    return {**base, "method": "prune", "prune": {"amount": AMOUNT_UNSTRUCTURED, "structured": False}}


def run_job(
    name: str, form: str, job: str, source: Path, folder: Path, eval_runs: int, original: nn.Module
) -> dict[str, Any]:
    spec = spec_for(name, job, eval_runs)
    out = folder / f"{name}-{job}{source.suffix}"
    row: dict[str, Any] = {"model": name, "format": form, "job": job, "spec": spec}
    started = time.perf_counter()
    try:
        report = compress(source, parse_spec(spec), out)
    except Exception as error:  # a failed job is a row with its reason
        row.update(
            succeeded=False,
            seconds=round(time.perf_counter() - started, 1),
            error=f"{getattr(error, 'slug', type(error).__name__)}: {_first_line(error)}",
        )
        return row
    row.update(
        succeeded=True,
        seconds=round(time.perf_counter() - started, 1),
        out=out,
        bytes_ratio=report["size"]["ratio"],
        bytes=[report["size"]["bytes_before"], report["size"]["bytes_after"]],
        report_cosine=report["fidelity"]["cosine_similarity"],
        report_parameters=report["parameters"],
        report_latency=report["latency"],
        warnings=report["warnings"],
        timings_s=report.get("timings_s"),
    )
    details = report["details"]
    result = load_result(form, out)
    held_out = examples(name, seed=7)
    with torch.no_grad():
        expected, got = original(*held_out), result(*held_out)
    row["shapes_kept"] = tuple(expected.shape) == tuple(got.shape)
    if row["shapes_kept"]:
        row["held_out_cosine"] = float(
            nn.functional.cosine_similarity(expected.double().flatten(), got.double().flatten(), dim=0)
        )
    row["output_shape"] = list(got.shape)
    if job == "int8":
        row["quantized"] = _quantized_summary(details)
    elif job in STRUCTURED:
        row.update(_structured_summary(details))
        row["parameters"] = [_parameters(original), _parameters(result)]
        row["parameter_ratio"] = row["parameters"][1] / row["parameters"][0]
        row["_result"] = result
    else:
        row["sparsity"] = details.get("sparsity")
        row["layers_pruned"] = len(details.get("layers", []))
        row["linear_sparsity_in_file"] = _linear_sparsity(original, result)
        row["left_whole"] = [f"{e.get('module')}: {e.get('reason')}" for e in details.get("left_whole", [])]
    return row


def _quantized_summary(details: dict[str, Any]) -> dict[str, Any]:
    """Which layers went int8, from either path's details (TorchScript: quantized_modules; .pt2: quantized)."""
    if "quantized_modules" in details:
        kernels: dict[str, int] = {}
        for entry in details["quantized_modules"]:
            kernels[entry["kernel"]] = kernels.get(entry["kernel"], 0) + 1
        kept = [entry["module"] for entry in details.get("kept_float", [])]
        return {"kernels": kernels, "kept_float": kept[:8]}
    return {
        "quantized": len(details.get("quantized", [])),
        "left_float": [f"{e['module']}: {e['reason']}" for e in details.get("left_float", [])][:8],
    }


def _structured_summary(details: dict[str, Any]) -> dict[str, Any]:
    heads = [group["heads"] for group in details.get("groups", []) if "heads" in group]
    widths = [
        (group["group"], group["channels_before"], group["channels_after"])
        for group in details.get("groups", [])
        if "heads" not in group
    ]
    put_back = [e for e in details.get("left_whole", []) if str(e.get("reason", "")).startswith("put back")]
    return {
        "heads": [f"{len(h['kept'])}/{h['before']}" for h in heads],
        "widths": [
            f"{group.rsplit('.', 2)[-2] if '.' in group else group}.{group.rsplit('.', 1)[-1]} {before}->{after}"
            for group, before, after in widths
        ],
        "heads_removed": any(len(h["kept"]) < h["before"] for h in heads),
        "mlp_removed": any(after < before for _, before, after in widths),
        "proof_passed": not put_back,
        "put_back": [f"{e['group']}: {e['reason'][:160]}" for e in put_back],
        "left_whole": [f"{e['group']}: {e['reason'][:160]}" for e in details.get("left_whole", [])][:12],
    }


def _parameters(model: Any) -> int:
    """Parameters counted once per tensor in memory: a loaded program gives tied weights (GPT-2's
    ``lm_head`` and ``wte``) two Parameter objects over one storage."""
    seen, total = set(), 0
    for parameter in model.parameters():
        key = (parameter.data_ptr(), parameter.numel())
        if key not in seen:
            seen.add(key)
            total += parameter.numel()
    return total


def _linear_sparsity(original: nn.Module, result: Any) -> float | None:
    """Zeros over every weight of 2+ dimensions that is not an embedding table, in the result file
    (the excluded classifier included): the acceptance's "all linear weights", counted independently."""
    embeddings = {f"{name}.weight" for name, module in original.named_modules() if isinstance(module, nn.Embedding)}
    weights = [p for n, p in _named_tensors(result) if p.dim() >= 2 and n not in embeddings and p.is_floating_point()]
    total = sum(p.numel() for p in weights)
    return float(sum(int((p == 0).sum()) for p in weights) / total) if total else None


def _named_tensors(result: Any) -> list[tuple[str, torch.Tensor]]:
    seen, named = set(), []
    for name, tensor in result.named_parameters():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            named.append((name, tensor))
    return named


# ---------------------------------------------------------------------------- the peer


class PeerTimeout(Exception):
    pass


def _give_up(signum: int, frame: Any) -> None:
    raise PeerTimeout


def torch_pruning(name: str, model: nn.Module, limit_s: int) -> dict[str, Any]:
    """Torch-Pruning 1.6.1 on ``model`` (modified in place): heads and MLP width at the same amount.
    Given up after ``limit_s`` seconds (SIGALRM), with where it was."""
    import torch_pruning as tp

    row: dict[str, Any] = {"model": name}
    inner = model.model
    if name == "gpt2":
        return {
            **row,
            "succeeded": False,
            "error": "not run: Torch-Pruning has no pruner for transformers' "
            "Conv1D (GPT-2's layers); a customized pruner would be needed",
        }
    example = examples(name, seed=1)
    before = _parameters(model)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(limit_s)
    try:
        attentions, ignored = _attention_layers(name, inner)
        num_heads = {}
        for _, q, k, v in attentions:
            for layer in (q, k, v):
                num_heads[layer] = HEADS
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=False,
            pruning_ratio=AMOUNT_STRUCTURED,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=AMOUNT_STRUCTURED,
            ignored_layers=ignored,
            output_transform=lambda out: out.sum(),
        )
        pruner.step()
        kept_heads = []
        for attention, q, _, _ in attentions:
            heads = pruner.num_heads[q]
            _set_heads(attention, heads, q.out_features // heads)
            kept_heads.append(f"{heads}/{HEADS}")
        with torch.no_grad():
            expected_shape = tuple(build(name)(*example).shape)
            shape = tuple(model(*examples(name, seed=7)).shape)
    except PeerTimeout as error:
        where = traceback.extract_tb(error.__traceback__)[-2]
        return {
            **row,
            "succeeded": False,
            "error": f"gave up after {limit_s} s: Torch-Pruning was still in "
            f"{Path(where.filename).parent.name}/{Path(where.filename).name} ({where.name}), "
            "building its pruning groups",
        }
    except Exception as error:
        traceback.print_exc(limit=2)
        return {**row, "succeeded": False, "error": f"{type(error).__name__}: {_first_line(error)}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    widths = [
        f"{n} {m.out_features}"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(("intermediate.dense", "mlp.fc1", "mlp.gate_proj"))
    ]
    after = _parameters(model)
    return {
        **row,
        "succeeded": True,
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": [before, after],
        "parameter_ratio": after / before,
        "heads": kept_heads,
        "mlp_widths": widths,
        "shapes_kept": shape == expected_shape,
    }


def _attention_layers(name: str, inner: nn.Module) -> tuple[list[tuple], list[nn.Module]]:
    """(attention module, q, k, v) per layer, and the layers Torch-Pruning must leave whole: the
    residual-stream writers (so that only heads and MLP width are pruned) and the classifier / LM head."""
    attentions, ignored = [], []
    for module_name, module in inner.named_modules():
        for q, k, v, out in (("query", "key", "value", None), ("q_proj", "k_proj", "v_proj", "o_proj")):
            if all(isinstance(getattr(module, n, None), nn.Linear) for n in (q, k, v)):
                attentions.append((module, getattr(module, q), getattr(module, k), getattr(module, v)))
                if out is not None:
                    ignored.append(getattr(module, out))
        last = module_name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and (
            module_name.endswith(("attention.output.dense", "mlp.fc2", "mlp.down_proj"))
            or (module_name.endswith("output.dense") and "attention" not in module_name)
            or last in ("classifier", "lm_head")
        ):
            ignored.append(module)
    return attentions, ignored


def _set_heads(attention: nn.Module, heads: int, head_size: int) -> None:
    """As Torch-Pruning's prune_hf_vit.py / prune_hf_bert.py do after pruning, where the module keeps
    head counts (BERT); ViT and Llama attention reshape to ``(-1, head_dim)``, which follows by itself."""
    if hasattr(attention, "num_attention_heads"):
        attention.num_attention_heads = heads
        attention.attention_head_size = head_size
        attention.all_head_size = heads * head_size


# ---------------------------------------------------------------------------- timing


def time_structured(
    name: str,
    rows: list[dict[str, Any]],
    uploads: dict[str, Any],
    original: nn.Module,
    peer_model: nn.Module | None,
    runs: int,
) -> dict[str, float]:
    """Interleaved medians of each upload and its structured result, the original module and the peer's."""
    batch = examples(name, seed=3)
    variants: dict[str, Callable[..., Any]] = {"eager original": original}
    if peer_model is not None:
        variants["torch-pruning"] = peer_model
    for row in rows:
        if row["job"] in STRUCTURED and row.get("succeeded"):
            form = row["format"]
            variants[f"{form} original"] = load_result(form, uploads[form]["path"])
            variants[_timed_as(row)] = row.pop("_result")
    return interleaved_medians(variants, batch, runs=runs, warmup=3)


# ---------------------------------------------------------------------------- acceptance and table


def verdicts(row: dict[str, Any], peer: dict[str, Any] | None) -> list[tuple[str, bool | None, bool]]:
    """(item, passed, timing?) for one row; passed None: not measurable (the job failed)."""
    ok = row.get("succeeded")
    if row["job"] == "int8":
        return [
            ("bytes <= 0.30x", ok and row["bytes_ratio"] <= 0.30, False),
            ("cosine >= 0.998", ok and row["report_cosine"] >= 0.998, False),
        ]
    if row["job"] == "unstructured":
        return [("sparsity 0.5 +- 0.01", ok and abs(row["sparsity"] - 0.5) <= 0.01, False)]
    items = [
        ("params <= 0.75x", ok and row["parameter_ratio"] <= 0.75, False),
        ("heads and MLP width removed", ok and row["heads_removed"] and row["mlp_removed"], False),
        ("shapes kept, proof passed", ok and row["shapes_kept"] and row["proof_passed"], False),
    ]
    if row["model"] in PEER_BOUND and row["job"] == "structured":  # the peer prunes heads and MLP width only
        usable = ok and peer is not None and peer.get("succeeded")
        items.append(
            (
                "within 0.10 of TP params",
                usable and abs(row["parameter_ratio"] - peer["parameter_ratio"]) <= 0.10,
                False,
            )
        )
        latency = row.get("latency_ratio")
        items.append(
            (
                "latency ratio <= TP's",
                usable
                and latency is not None
                and peer.get("latency_ratio") is not None
                and latency <= peer["latency_ratio"],
                True,
            )
        )
    return items


def _timed_as(row: dict[str, Any]) -> str:
    return f"{row['format']} modelpress" + (" hidden" if row["job"] == "hidden" else "")


def cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]], peers: dict[str, dict[str, Any]], exports: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | upload | job | result | params / bytes ratio | cosine (report / held out) | heads kept | "
        "latency ratio | Torch-Pruning params | TP latency ratio | TP heads | acceptance |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, forms in exports.items():
        for form, made in forms.items():
            if "error" in made:
                lines.append(
                    f"| {name} | {form} | - | export failed: {made['error'][:150].replace('|', '/')} "
                    "| - | - | - | - | - | - | - | - |"
                )
    for row in rows:
        peer = peers.get(row["model"]) if row["job"] == "structured" else None
        acceptance = "; ".join(
            f"{item} {'PASS' if passed else 'MISS'}{' (timing)' if timing else ''}"
            for item, passed, timing in row["verdicts"]
        )
        if not row.get("succeeded"):
            lines.append(
                f"| {row['model']} | {row['format']} | {row['job']} | failed: "
                f"{row['error'][:200].replace('|', '/')} | - | - | - | - | - | - | - | "
                f"job failed: {len(row['verdicts'])} item(s) MISS |"
            )
            continue
        cosine = f"{cell(row['report_cosine'], 5)} / {cell(row.get('held_out_cosine'), 5)}"
        if row["job"] == "int8":
            result, ratio, heads, latency = "ok", f"{cell(row['bytes_ratio'])}x bytes", "-", "-"
        elif row["job"] in STRUCTURED:
            mlp = sorted({w.split(" ", 1)[1] for w in row["widths"]})
            result = ("proof passed" if row["proof_passed"] else f"{len(row['put_back'])} group(s) put back") + (
                f"; widths {', '.join(mlp)}" if mlp else ""
            )
            ratio = f"{cell(row['parameter_ratio'])}x params"
            heads = _counted(row["heads"]) or "none"
            latency = cell(row.get("latency_ratio"))
        else:
            result = f"sparsity {cell(row['sparsity'], 4)} over {row['layers_pruned']} layers"
            ratio = f"{cell(row['bytes_ratio'])}x bytes"
            heads, latency = "-", "-"
            cosine += f" (all linear weights in file: {cell(row['linear_sparsity_in_file'], 3)} zero)"
        tp_params = tp_latency = tp_heads = "-"
        if peer is not None:
            if peer.get("succeeded"):
                tp_params, tp_latency, tp_heads = (
                    f"{cell(peer['parameter_ratio'])}x",
                    cell(peer.get("latency_ratio")),
                    _counted(peer["heads"]),
                )
            else:
                tp_params = peer["error"][:120].replace("|", "/")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["model"],
                    row["format"],
                    row["job"],
                    result,
                    ratio,
                    cosine,
                    heads,
                    latency,
                    tp_params,
                    tp_latency,
                    tp_heads,
                    acceptance,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _counted(items: list[str]) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return ", ".join(f"{item} x{count}" for item, count in counts.items())


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = arguments(__doc__, "transformers")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--formats", default=",".join(FORMATS), help="torchscript (traced), pt2 (torch.export)")
    parser.add_argument("--jobs", default="int8,structured,hidden,unstructured")
    parser.add_argument("--runs", type=int, default=30, help="interleaved timed rounds (structured rows)")
    parser.add_argument("--eval-runs", type=int, default=10, help="the job's evaluation.runs")
    parser.add_argument(
        "--peer-limit", type=int, default=120, help="seconds before Torch-Pruning is given up on a model"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a non-timing acceptance item misses")
    args = parser.parse_args()
    prepare(args)
    started, load_before = time.perf_counter(), list(os.getloadavg())
    rows: list[dict[str, Any]] = []
    peers: dict[str, dict[str, Any]] = {}
    exports: dict[str, dict[str, Any]] = {}
    facts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transformers-") as scratch:
        for name in args.models.split(","):
            folder = Path(scratch) / name
            folder.mkdir()
            original = build(name)
            peer_model = copy.deepcopy(original)
            with torch.no_grad():
                output = original(*examples(name, seed=1))
            facts[name] = {
                "model": MODELS[name][1],
                "parameters": _parameters(original),
                "output_shape": list(output.shape),
                "output_abs_mean": float(output.abs().mean()),
                "output_all_zero": bool((output == 0).all()),
            }
            print(
                f"{name}: {facts[name]['parameters']:,} parameters, output {list(output.shape)}, mean |output| "
                f"{facts[name]['output_abs_mean']:.4f}, all zero: {facts[name]['output_all_zero']}",
                flush=True,
            )
            exports[name] = {form: upload(name, original, form, folder) for form in args.formats.split(",")}
            model_rows = []
            for form, made in exports[name].items():
                if "error" in made:
                    print(f"{name} {form}: export failed: {made['error']}", flush=True)
                    continue
                for job in args.jobs.split(","):
                    row = run_job(name, form, job, made["path"], folder, args.eval_runs, original)
                    model_rows.append(row)
                    print(_progress_line(row), flush=True)
            peers[name] = torch_pruning(name, peer_model, args.peer_limit)
            peer = peers[name]
            print(f"{name} torch-pruning: {_short(peer)}", flush=True)
            latency = time_structured(
                name, model_rows, exports[name], original, peer_model if peer.get("succeeded") else None, args.runs
            )
            facts[name]["latency_ms"] = latency
            if "torch-pruning" in latency:
                peer["latency_ratio"] = latency["torch-pruning"] / latency["eager original"]
            for row in model_rows:
                if row["job"] in STRUCTURED and _timed_as(row) in latency:
                    row["latency_ratio"] = latency[_timed_as(row)] / latency[f"{row['format']} original"]
                row.pop("_result", None)
                row.pop("out", None)
                row["verdicts"] = verdicts(row, peer)
            rows += model_rows
            print(
                f"{name} latency ms (interleaved medians): " + ", ".join(f"{k} {v:.2f}" for k, v in latency.items()),
                flush=True,
            )
    print()
    print(table(rows, peers, exports))
    misses = [
        (r["model"], r["format"], r["job"], item)
        for r in rows
        for item, passed, timing in r["verdicts"]
        if not passed and not timing
    ]
    print(f"\nnon-timing MISS: {len(misses)}" + "".join(f"\n  {m}" for m in misses))
    from importlib.metadata import version

    import torch_pruning as tp

    for exported in exports.values():
        for made in exported.values():
            made.pop("path", None)
    write_results(
        args,
        {
            "machine": machine(
                args,
                transformers=transformers.__version__,
                torch_pruning=version("torch-pruning"),
                torch_pruning_module_version=getattr(tp, "__version__", None),
                load_average_at_start=load_before,
                wall_s=round(time.perf_counter() - started, 1),
                runs=args.runs,
                eval_runs=args.eval_runs,
                batch=BATCH,
                sequence=SEQUENCE,
                statistic="median of interleaved rounds",
            ),
            "models": facts,
            "exports": exports,
            "rows": rows,
            "torch_pruning": peers,
            "non_timing_misses": [list(m) for m in misses],
        },
    )
    if args.check and (misses or any(not r.get("succeeded") for r in rows)):
        sys.exit(1)


def _progress_line(row: dict[str, Any]) -> str:
    head = f"{row['model']} {row['format']} {row['job']} ({row['seconds']} s):"
    if not row.get("succeeded"):
        return f"{head} FAILED {row['error']}"
    if row["job"] == "int8":
        return f"{head} bytes {row['bytes_ratio']}, cosine {row['report_cosine']}, {row['quantized']}"
    if row["job"] in STRUCTURED:
        return (
            f"{head} params {row['parameter_ratio']:.3f}, heads {row['heads']}, widths {row['widths']}, "
            f"proof {'passed' if row['proof_passed'] else 'put back ' + str(row['put_back'])}, "
            f"cosine {row['report_cosine']}, left whole {row['left_whole'][:4]}"
        )
    return (
        f"{head} sparsity {row['sparsity']} over {row['layers_pruned']} layers, file {row['linear_sparsity_in_file']}"
    )


def _short(peer: dict[str, Any]) -> str:
    if not peer.get("succeeded"):
        return f"FAILED {peer['error']}"
    return f"params {peer['parameter_ratio']:.3f}, heads {peer['heads']}, widths {peer['mlp_widths']}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:600]


if __name__ == "__main__":
    main()
