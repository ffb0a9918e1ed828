"""Quantization-aware training of a ``.pt2`` program (``quantize.mode: "qat"``) through PT2E's QAT flow,
and the entry point of ``.pt2`` quantization (the method registry's): ``qat`` here, every other mode in
``exported.quantize_program``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.export import ExportedProgram

from modelpress.options import QuantizeOptions
from workers.engine.errors import InvalidInput
from workers.engine.formats.exported import runnable
from workers.engine.inputs import Dataset
from workers.engine.methods.quantize.exported import quantize_program
from workers.engine.methods.quantize.qat import VALIDATION_FRACTION, best_of
from workers.engine.methods.training import finetune, split

Progress = Callable[[str, float], None]


def quantize_exported(
    program: ExportedProgram, options: QuantizeOptions, data: Dataset, progress: Progress
) -> tuple[ExportedProgram, dict[str, Any]]:
    """Quantize a program as ``options.mode`` says."""
    if options.mode == "qat":
        return quantize_program_qat(program, options, data, progress)
    return quantize_program(program, options, data, progress)


def quantize_program_qat(
    program: Any, options: QuantizeOptions, data: Dataset, progress: Progress
) -> tuple[Any, dict[str, Any]]:
    """QAT of a ``.pt2`` program through PT2E's QAT flow (weights and activations fake-quantized, BatchNorm
    trained), beside static PTQ of the same program; the better of the two on held-out rows."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    if data.synthetic:
        raise InvalidInput("quantization-aware training needs a data file to train on; random inputs teach nothing")
    training = options.qat
    train, held = split(data, VALIDATION_FRACTION, training.seed)
    static_options = dataclasses.replace(options, mode="static", qat=None)
    progress("static PTQ for comparison", 0.02)
    ptq = quantize_program(
        program, static_options, train, lambda stage, fraction: progress(f"PTQ: {stage}", 0.02 + 0.28 * fraction)
    )
    teacher = runnable(program)

    def fit(prepared: torch.fx.GraphModule) -> list[dict[str, float]]:
        move_exported_model_to_train(prepared)
        history = finetune(
            prepared,
            train,
            teacher,
            epochs=training.epochs,
            lr=training.lr,
            batch_size=training.batch_size,
            seed=training.seed,
            progress=lambda stage, fraction: progress(
                f"QAT {stage.removeprefix('fine-tuning ')}", 0.3 + 0.6 * fraction
            ),
        )
        move_exported_model_to_eval(prepared)
        return history

    qat, qat_details = quantize_program(program, options, train, progress, train=fit)
    history = qat_details.pop("qat_history", [])
    about = {
        "notes": [
            "PT2E's QAT flow (prepare_qat_pt2e): weights and activations fake-quantized during training, "
            "BatchNorm trained with them, then converted like static"
        ]
    }
    return best_of(teacher, held, ptq, (qat, qat_details), history, training, about, runner=runnable)
