"""Quantization-aware training (``quantize.mode: "qat"``) of a TorchScript model, ending in the same
int8 kernels as ``static``.

1. BatchNorm is folded into the conv before it (``_jit_pass_fold_convbn``, what ``prepare_jit`` does
   for ``static``), so the weights trained are the weights that will be quantized, and BatchNorm
   statistics stay fixed while training (frozen-BN QAT).
2. For ``qat.epochs`` on the training rows (labels when given, else agreement with the float model),
   every weight that ``static`` would quantize is fake-quantized in the forward pass exactly as the
   static int8 result stores it (symmetric int8, per output channel or per tensor, ranges from the
   same observer) and updated in float through the straight-through estimator: the weights learn
   to sit where rounding hurts least. Activations are not fake-quantized during training (their
   ranges are calibrated after it, as ``static`` does): a TorchScript graph gives no place to insert
   per-instance activation quantizers without rewriting shared method graphs.
3. The trained model goes through ``static`` (calibration, fallback, ``convert_jit``).

The same job also runs plain static PTQ on the original, and scores float, PTQ and QAT on held-out
rows of the data file; the better of PTQ and QAT is returned (the report says which and why).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from modelpress.options import QuantizeOptions
from workers.engine.errors import InvalidInput
from workers.engine.formats.torchscript import clone_model
from workers.engine.inputs import Dataset
from workers.engine.methods.quantize.static import quantize_static, static_layers
from workers.engine.methods.training import accuracy, finetune, split
from workers.engine.outputs import select_output
from workers.engine.torchscript_graph import quiet_torchscript_warnings

Progress = Callable[[str, float], None]
VALIDATION_FRACTION = 0.2


def quantize_qat(
    model: torch.jit.ScriptModule, options: QuantizeOptions, data: Dataset, progress: Progress
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Train with fake-quantized weights, then static int8; the better of it and static PTQ, with both scores."""
    if data.synthetic:
        raise InvalidInput("quantization-aware training needs a data file to train on; random inputs teach nothing")
    training = options.qat
    static_options = dataclasses.replace(options, mode="static", qat=None)
    train, held = split(data, VALIDATION_FRACTION, training.seed)
    model = model.eval()

    progress("static PTQ for comparison", 0.02)
    ptq, ptq_details = quantize_static(
        clone_model(model),
        static_options,
        train,
        lambda stage, fraction: progress(f"PTQ: {stage}", 0.02 + 0.18 * fraction),
    )

    progress("folding BatchNorm", 0.2)
    with quiet_torchscript_warnings():
        # Reloaded (clone_model): the folded module's tensors are not leaves an optimiser takes.
        folded = clone_model(
            torch.jit._recursive.wrap_cpp_module(torch._C._jit_pass_fold_convbn(clone_model(model)._c))
        )
    weights = _quantized_weights(folded, options)
    fake = _FakeQuantizedWeights(weights, options.per_channel)
    history = finetune(
        folded,
        train,
        model,
        epochs=training.epochs,
        lr=training.lr,
        batch_size=training.batch_size,
        seed=training.seed,
        before_forward=fake.swap_in,
        before_step=fake.swap_out,
        progress=lambda stage, fraction: progress(f"QAT {stage.removeprefix('fine-tuning ')}", 0.2 + 0.6 * fraction),
    )
    folded.eval()

    progress("static int8 of the trained model", 0.8)
    qat, qat_details = quantize_static(
        folded, static_options, train, lambda stage, fraction: progress(f"QAT: {stage}", 0.8 + 0.17 * fraction)
    )
    notes = [
        "BatchNorm folded into the convolutions before training (its statistics fixed); weights "
        "fake-quantized as the int8 result stores them, straight-through gradients; activation ranges "
        "calibrated after training"
    ]
    details = dict(fake_quantized_weights=len(weights), notes=notes)
    progress("quantized", 0.98)
    return best_of(model, held, (ptq, ptq_details), (qat, qat_details), history, training, details)


def best_of(
    original: Any,
    held: Dataset,
    ptq: tuple[Any, dict[str, Any]],
    qat: tuple[Any, dict[str, Any]],
    history: list[dict[str, float]],
    training: Any,
    about: dict[str, Any],
    runner: Callable[[Any], Any] = lambda model: model,
) -> tuple[Any, dict[str, Any]]:
    """Score the float model, static PTQ and QAT on the held-out rows; return the better int8 model of the
    two with its details, under which ``qat`` says what training did and how each scored. ``runner`` makes
    a result callable (a program's module)."""
    scores = {
        name: score(candidate, original, held)
        for name, candidate in (("float", original), ("static_ptq", runner(ptq[0])), ("qat", runner(qat[0])))
    }
    measure = "accuracy" if held.labels is not None else "top1_agreement"
    chosen = "qat" if scores["qat"] >= scores["static_ptq"] else "static_ptq"
    model, details = qat if chosen == "qat" else ptq
    details = dict(details)
    details["mode"] = "qat"
    notes = [
        *about.pop("notes", []),
        f"{len(held)} rows of the data file held out for the validation scores "
        f"({VALIDATION_FRACTION:.0%}); training and calibration used the rest",
    ]
    details["qat"] = {
        "epochs": history,
        "lr": training.lr,
        "batch_size": training.batch_size,
        **about,
        "validation": {"measure": measure, "rows": len(held), **{k: round(v, 6) for k, v in scores.items()}},
        "returned": chosen,
        "notes": notes,
    }
    if chosen == "static_ptq":
        details["warnings"] = [
            *details.get("warnings", []),
            f"quantization-aware training did not beat static PTQ on the held-out rows ({measure} "
            f"{scores['qat']:.4f} vs {scores['static_ptq']:.4f}): the static PTQ result is "
            "returned; more epochs or a smaller qat.lr may help",
        ]
    return model, details


class _FakeQuantizedWeights:
    """Straight-through fake quantization of weights: the forward pass sees int8-rounded weights, the
    optimiser updates the float ones with the gradient taken at the rounded point."""

    def __init__(self, weights: list[torch.Tensor], per_channel: bool) -> None:
        self.weights, self.per_channel = weights, per_channel
        self.float: list[torch.Tensor] = []

    def swap_in(self) -> None:
        self.float = [weight.detach().clone() for weight in self.weights]
        with torch.no_grad():
            for weight in self.weights:
                weight.copy_(fake_quantize_weight(weight, self.per_channel))

    def swap_out(self) -> None:
        with torch.no_grad():
            for weight, kept in zip(self.weights, self.float):
                weight.copy_(kept)


def fake_quantize_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``weight`` rounded as static int8 stores it: torch's symmetric qint8 observers' scales, [-128, 127]."""
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    if per_channel:
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    observer(weight.detach())
    scale, zero_point = observer.calculate_qparams()
    if per_channel:
        return torch.fake_quantize_per_channel_affine(weight, scale.float(), zero_point.int(), 0, -128, 127)
    return torch.fake_quantize_per_tensor_affine(weight, float(scale), int(zero_point), -128, 127)


def _quantized_weights(model: torch.jit.ScriptModule, options: QuantizeOptions) -> list[torch.Tensor]:
    """The weight of every layer ``static`` would quantize (selected type, not excluded)."""
    modules = dict(model.named_modules())
    weights = [getattr(modules[name], "weight", None) for name in static_layers(model, options)[0] if name in modules]
    return [w for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() >= 2]


def score(candidate: Any, reference: Any, held: Dataset) -> float:
    """Accuracy on the held-out rows with labels, else top-1 agreement with the float model."""
    if held.labels is not None:
        scored = accuracy(candidate, held)
        if scored is not None:
            return scored
    with torch.no_grad(), quiet_torchscript_warnings():
        inputs = held.rows(slice(0, len(held)))
        ours = select_output(candidate(*inputs), held.target_output)
        theirs = select_output(reference(*inputs), held.target_output)
    if ours.dim() == 2 and ours.shape[1] > 1:
        return float((ours.argmax(1) == theirs.argmax(1)).float().mean())
    return float(torch.nn.functional.cosine_similarity(ours.flatten().float(), theirs.flatten().float(), dim=0))
