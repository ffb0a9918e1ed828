"""Distilling a torch.export program (``.pt2``) into a student, exported again: a ``.pt2`` in, a ``.pt2`` out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.export import ExportedProgram

from modelpress.formats import EXPORTED
from modelpress.options import DistillOptions, method_options
from workers.engine.errors import NothingToPrune, UnsupportedModel
from workers.engine.formats.exported import fixed_batch, reexport, runnable, unwrapped
from workers.engine.inputs import Dataset
from workers.engine.methods.distill.torchscript import distill
from workers.engine.methods.prune.exported import prune_channels

Progress = Callable[[str, float], None]


def distill_program(
    program: ExportedProgram,
    options: DistillOptions,
    data: Dataset,
    progress: Progress,
    student: torch.nn.Module | None = None,
) -> tuple[ExportedProgram, dict[str, Any]]:
    """Distil the program into a student (an uploaded ``.pt2``'s module, or a torchvision model) and
    export the trained student with the teacher's dynamic axes: a ``.pt2`` in, a ``.pt2`` out.

    Exported graphs are fixed to the mode they were exported in (eval: BatchNorm uses its running
    statistics, dropout is off), so an uploaded ``.pt2`` student trains its weights in that mode."""
    unsupported = [name for name, value in (("features", options.features), ("schedule", options.schedule)) if value]
    if unsupported:
        raise UnsupportedModel(
            f"distill.{' and distill.'.join(unsupported)} train TorchScript models only; for a "
            "torch.export (.pt2) program leave them out, or upload the model as TorchScript"
        )
    origin = None
    if options.student.source == "width":  # cut from the teacher by structured pruning, as for TorchScript
        width = float(options.student.width)
        try:
            narrowed, pruned = prune_channels(
                program,
                method_options("prune", {"amount": 1.0 - width, "structured": True}),
                data,
                lambda stage, fraction: None,
            )
        except NothingToPrune as error:
            raise NothingToPrune(
                f"no channel group of the teacher can be narrowed for a width student: {error}"
            ) from None
        student = runnable(narrowed)
        options = dataclasses.replace(options, student=dataclasses.replace(options.student, source="upload"))
        origin = {"from": "width", "width": width, "groups": pruned["groups"], "left_whole": pruned["left_whole"]}
    trained, details = distill(runnable(program), options, data, progress, student=student, scripted=False)
    details["format"] = EXPORTED
    if origin is not None:
        details["student"] = origin
    return reexport(unwrapped(trained), program, data.exactly(fixed_batch(program) or 2)), details
