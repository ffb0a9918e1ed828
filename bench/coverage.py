"""Coverage of structured pruning: 20 architectures, scripted and traced, next to Torch-Pruning 1.6.1.

    .venv/bin/python bench/coverage.py [--amounts 0.3,0.5] [--models resnet18,vgg11_bn] [--runs 5]
    .venv/bin/python bench/coverage.py --merge bench/results/coverage-*.json   # join shards run apart

Each model has random weights (BatchNorm statistics set by three train-mode passes) and is saved
as TorchScript, then pruned through the engine (``compress``) with ``input_shape`` inputs (the
spec's ``inputs`` entries for the two-input model). For
each amount the row says: accepted (the submit-time archive check), succeeded, parameter ratio
(parameters only, on the saved and reloaded file), MACs ratio (the engine's report), latency ratio
(median, batch 4), output shapes kept, and the reasons groups were left whole. In the same run,
Torch-Pruning 1.6.1 (``pip install .[bench]``) prunes the same ``nn.Module`` with the same amount,
L1 magnitude importance and the classifier ignored; its latency is timed the same way.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.archive import ArchiveRejected, check_torchscript_archive  # noqa: E402
from workers.engine.measure import median_latency_ms  # noqa: E402
from workers.engine.run.pipeline import compress  # noqa: E402

IMAGE = [2, 3, 64, 64]
SEQUENCE = [2, 12, 32]


# ---------------------------------------------------------------------------- models people bring


class FunctionalCNN(nn.Module):
    """A CNN written with torch.nn.functional and bare parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(32, 3, 3, 3) * 0.2), nn.Parameter(torch.zeros(32))
        self.w2, self.b2 = nn.Parameter(torch.randn(64, 32, 3, 3) * 0.06), nn.Parameter(torch.zeros(64))
        self.w3, self.b3 = nn.Parameter(torch.randn(128, 64, 3, 3) * 0.04), nn.Parameter(torch.zeros(128))
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w1, self.b1, padding=1)), 2)
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w2, self.b2, padding=1)), 2)
        x = F.relu(F.conv2d(x, self.w3, self.b3, padding=1))
        return self.fc(F.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1), 0.2, self.training))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q = self.query(x).view(batch, tokens, self.heads, -1).transpose(1, 2)
        k = self.key(x).view(batch, tokens, self.heads, -1).transpose(1, 2)
        v = self.value(x).view(batch, tokens, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, width))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = Attention(width, heads)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.intermediate, self.output = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.output(F.gelu(self.intermediate(x))))


class BertStyle(nn.Module):
    """A BERT-style encoder over float token features (a projection stands in for the embedding table)."""

    def __init__(self, features: int = 32, width: int = 128, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.position = nn.Parameter(torch.randn(1, 12, width) * 0.02)
        self.layers = nn.ModuleList([EncoderLayer(width, 4, 4 * width) for _ in range(layers)])
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class Recurrent(nn.Module):
    def __init__(self, cell: str, features: int = 32, hidden: int = 96, classes: int = 10) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(features, hidden, num_layers=2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.fc2(torch.relu(self.fc1(y[:, -1])))


class TwoInputs(nn.Module):
    """An image and a side vector: ``input_shape`` describes one input only."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.side = nn.Linear(8, 32)
        self.fc = nn.Linear(64, classes)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(torch.relu(self.conv(image)), 1).flatten(1)
        return self.fc(torch.cat([pooled, torch.relu(self.side(side))], 1))


def _torchvision(arch: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(arch, weights=None, num_classes=10, **options)

    return build


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=64, patch_size=16, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=512, num_classes=10
    )


# name -> (builder, example input shape, the classifier Torch-Pruning must ignore)
MODELS: dict[str, tuple[Callable[[], nn.Module], list[int], str]] = {
    "resnet18": (_torchvision("resnet18"), IMAGE, "fc"),
    "resnet50": (_torchvision("resnet50"), IMAGE, "fc"),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), IMAGE, "classifier.1"),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), IMAGE, "classifier.3"),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), IMAGE, "classifier.1"),
    "densenet121": (_torchvision("densenet121"), IMAGE, "classifier"),
    "shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0"), IMAGE, "fc"),
    "regnet_x_400mf": (_torchvision("regnet_x_400mf"), IMAGE, "fc"),
    "convnext_tiny": (_torchvision("convnext_tiny"), IMAGE, "classifier.2"),
    "vgg11_bn": (_torchvision("vgg11_bn"), IMAGE, "classifier.6"),
    "squeezenet1_0": (_torchvision("squeezenet1_0"), IMAGE, "classifier.1"),
    "googlenet": (_torchvision("googlenet", aux_logits=False, init_weights=False), IMAGE, "fc"),
    "mnasnet0_5": (_torchvision("mnasnet0_5"), IMAGE, "classifier.1"),
    "alexnet": (_torchvision("alexnet"), IMAGE, "classifier.6"),
    "functional_cnn": (FunctionalCNN, IMAGE, "fc"),
    "bert_style": (BertStyle, SEQUENCE, "classifier"),
    "vit_small": (_vit, IMAGE, "heads.head"),
    "lstm": (lambda: Recurrent("lstm"), SEQUENCE, "fc2"),
    "gru": (lambda: Recurrent("gru"), SEQUENCE, "fc2"),
    "two_inputs": (TwoInputs, IMAGE, "fc"),
}
TRACED = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vgg11_bn", "functional_cnn"]


# ---------------------------------------------------------------------------- runs


def _examples(name: str, shape: list[int], batch: int) -> tuple[torch.Tensor, ...]:
    first = torch.randn(batch, *shape[1:])
    return (first, torch.randn(batch, 8)) if name == "two_inputs" else (first,)


def build(name: str) -> nn.Module:
    builder, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = builder()
    model.train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm statistics from data, not the 0/1 defaults
            model(*_examples(name, shape, 4))
    return model.eval()


def modelpress_row(name: str, traced: bool, amount: float, runs: int, workdir: Path) -> dict[str, Any]:
    _, shape, _ = MODELS[name]
    model = build(name)
    path = workdir / f"{name}-{traced}.pt"
    with torch.no_grad():
        script = torch.jit.trace(model, _examples(name, shape, 1)) if traced else torch.jit.script(model)
    script.save(str(path))
    row: dict[str, Any] = {"model": name, "export": "trace" if traced else "script", "amount": amount}
    try:
        check_torchscript_archive(path, 1 << 32)
        row["accepted"] = True
    except ArchiveRejected as error:  # still pruned below: the engine loads it with torch.jit.load
        row.update(accepted=False, rejected_because=str(error)[:200])
    # One float input is ``input_shape``; several are the spec's ``inputs`` entries, one per argument.
    examples = _examples(name, shape, 4)
    described = (
        {"input_shape": list(examples[0].shape)}
        if len(examples) == 1
        else {"inputs": [{"shape": list(t.shape), "dtype": "float32"} for t in examples]}
    )
    spec = {
        "method": "prune",
        "seed": 0,
        **described,
        "evaluation": {"runs": runs, "warmup": 1},
        "prune": {
            "amount": amount,
            "structured": True,
            "criterion": "l1",
            "scope": "global",
            "modules": ["Conv2d", "Linear"],
            "exclude": None,
            "finetune": None,
        },
    }
    output = workdir / f"{name}-{traced}-{amount}-out.pt"
    started = time.perf_counter()
    try:
        report = compress(path, spec, output)
    except Exception as error:  # a failed job: the row keeps its reason
        row.update(
            succeeded=False,
            error=f"{getattr(error, 'slug', type(error).__name__)}: {str(error)[:600]}",
            seconds=round(time.perf_counter() - started, 1),
        )
        return row
    pruned = torch.jit.load(str(output))  # plain torch.jit.load, as a user would
    inputs = _examples(name, shape, 3)
    with torch.no_grad():
        shapes_kept = _shapes(pruned(*inputs)) == _shapes(script(*inputs))
    details = report["details"]
    reasons = Counter(_short(entry["reason"]) for entry in details.get("left_whole", []))
    row.update(
        succeeded=True,
        shapes_kept=bool(shapes_kept),
        seconds=round(time.perf_counter() - started, 1),
        parameters_ratio=_ratio(_parameters(pruned), _parameters(script)),
        macs_ratio=_ratio(details["macs"]["after"], details["macs"]["before"]),
        latency_ratio=report["latency"]["ratio"],
        groups_pruned=len(details["groups"]),
        groups_left_whole=len(details.get("left_whole", [])),
        left_whole_reasons=dict(reasons.most_common(4)),
    )
    return row


def torch_pruning_row(name: str, amount: float, runs: int) -> dict[str, Any]:
    import torch_pruning as tp

    _, shape, classifier = MODELS[name]
    model = build(name)
    example = _examples(name, shape, 1)
    batch = _examples(name, shape, 4)
    row: dict[str, Any] = {"model": name, "amount": amount}
    try:
        before_latency = median_latency_ms(model, batch, runs=runs)
        before_macs, before_params = tp.utils.count_ops_and_params(model, example)
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=amount,
            ignored_layers=[model.get_submodule(classifier)],
        )
        pruner.step()
        after_macs, after_params = tp.utils.count_ops_and_params(model, example)
        with torch.no_grad():
            model(*batch)
        after_latency = median_latency_ms(model, batch, runs=runs)
    except Exception as error:
        row.update(succeeded=False, error=f"{type(error).__name__}: {str(error)[:300]}")
        traceback.print_exc(limit=1)
        return row
    row.update(
        succeeded=True,
        parameters_ratio=_ratio(after_params, before_params),
        macs_ratio=_ratio(after_macs, before_macs),
        latency_ratio=_ratio(after_latency, before_latency),
    )
    return row


def _shapes(output: Any) -> list[tuple[int, ...]]:
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, (list, tuple)):
        return [shape for item in output for shape in _shapes(item)]
    return []


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ratio(after: float, before: float) -> float | None:
    return round(after / before, 3) if before else None


def _short(reason: str) -> str:
    return reason.split("; ")[0][:90]


# ---------------------------------------------------------------------------- table


def table(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> str:
    theirs = {(r["model"], r["amount"]): r for r in baseline}
    lines = [
        "| model | export | amount | accepted | succeeded | params | MACs | latency | Torch-Pruning params | TP MACs | TP latency | left whole (why) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        tp_row = theirs.get((r["model"], r["amount"]), {})
        why = (
            r.get("error")
            if not r.get("succeeded")
            else "; ".join(f"{k} x{v}" for k, v in r["left_whole_reasons"].items())
        )
        lines.append(
            "| "
            + " | ".join(
                str(x)
                for x in [
                    r["model"],
                    r["export"],
                    r["amount"],
                    "yes" if r.get("accepted") else "no",
                    "yes" if r.get("succeeded") else "no",
                    _cell(r.get("parameters_ratio")),
                    _cell(r.get("macs_ratio")),
                    _cell(r.get("latency_ratio")),
                    _cell(tp_row.get("parameters_ratio"), tp_row.get("error")),
                    _cell(tp_row.get("macs_ratio")),
                    _cell(tp_row.get("latency_ratio")),
                    (why or "").replace("|", "/")[:160],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _cell(value: float | None, error: str | None = None) -> str:
    if value is None:
        return "failed" if error else "-"
    return f"{value:.3g}"


def main() -> None:
    parser = arguments(__doc__, "coverage")
    parser.add_argument("--amounts", default="0.3,0.5")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--traced", default=",".join(TRACED), help="models also exported with torch.jit.trace")
    parser.add_argument("--merge", nargs="*", type=Path, help="join the JSON files of shards run apart")
    args = parser.parse_args()
    prepare(args)
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        # A later file's row replaces an earlier one for the same model, export and amount (a re-run shard).
        ours = {(r["model"], r["export"], r["amount"]): r for p in parts for r in p["modelpress"]}
        theirs = {(r["model"], r["amount"]): r for p in parts for r in p["torch_pruning"]}
        payload = {
            "machine": parts[0]["machine"],
            "modelpress": list(ours.values()),
            "torch_pruning": list(theirs.values()),
        }
        order = list(MODELS)
        payload["modelpress"].sort(key=lambda r: (order.index(r["model"]), r["export"], r["amount"]))
        print(table(payload["modelpress"], payload["torch_pruning"]))
        write_results(args, payload)
        return
    amounts = [float(a) for a in args.amounts.split(",")]
    names = [n for n in args.models.split(",") if n]
    rows, baseline = [], []
    with tempfile.TemporaryDirectory() as temp:
        for name in names:
            for traced in [False, True] if name in args.traced.split(",") else [False]:
                for amount in amounts:
                    rows.append(modelpress_row(name, traced, amount, args.runs, Path(temp)))
                    print(json.dumps(rows[-1]), flush=True)
            for amount in amounts:
                baseline.append(torch_pruning_row(name, amount, args.runs))
                print(json.dumps(baseline[-1]), flush=True)
    print(table(rows, baseline))
    import torch_pruning

    write_results(
        args,
        {
            "machine": machine(
                args,
                torch_pruning=getattr(torch_pruning, "__version__", "?"),
                input="batch 4 of 3x64x64 images or 12x32 sequences",
            ),
            "modelpress": rows,
            "torch_pruning": baseline,
        },
    )


if __name__ == "__main__":
    main()
