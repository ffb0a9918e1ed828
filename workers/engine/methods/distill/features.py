"""Feature distillation (``distill.features``): hint losses between intermediate activations.

Each hint pair compares a student layer's output with a teacher layer's: a learned projection
(a 1x1 convolution for [batch, channels, height, width] features, a linear map along the channel
axis otherwise) maps the student's channels to the teacher's, and the loss is the squared error
divided by the teacher features' mean square (so the weight means the same on any model). The
hint loss is the mean over the pairs; the projections train with the student and are dropped after.

Layers are read from the TorchScript graphs (``workers.engine.layer_outputs``). Named pairs are
checked against both models before training; a width student (the teacher with fewer channels,
the same module names) is matched automatically: the last conv layer of each stage (a run of
convs whose outputs have one spatial size), at most ``MAX_DEFAULT_HINTS``, the deepest kept; a
model without convs gets its last linear layer before the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.options import FeaturesOptions
from workers.engine.errors import InvalidInput, UnsupportedModel
from workers.engine.inputs import Inputs
from workers.engine.layer_outputs import LayerReader, readable_layers, unreadable_reason
from workers.engine.torchscript_graph import module_types, quiet_torchscript_warnings

CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")
MAX_DEFAULT_HINTS = 4


@dataclass(frozen=True)
class HintPair:
    student: str
    teacher: str
    student_shape: tuple[int, ...]  # on the probe batch
    teacher_shape: tuple[int, ...]
    axis: int  # the channel axis the projection maps

    def describe(self, projection: nn.Module) -> dict[str, Any]:
        kind = "conv 1x1" if isinstance(projection, nn.Conv2d) else "linear"
        return {
            "student": self.student,
            "teacher": self.teacher,
            "student_shape": list(self.student_shape),
            "teacher_shape": list(self.teacher_shape),
            "projection": f"{kind} {self.student_shape[self.axis]} -> {self.teacher_shape[self.axis]} "
            f"channels (axis {self.axis})",
            "projection_parameters": sum(p.numel() for p in projection.parameters()),
        }


def plan_hints(
    teacher: torch.jit.ScriptModule, student: torch.jit.ScriptModule, options: FeaturesOptions, probe: Inputs
) -> tuple[list[HintPair], str]:
    """The hint pairs (checked on both models, with their shapes on ``probe``) and how they were chosen."""
    if not isinstance(teacher, torch.jit.ScriptModule) or not isinstance(student, torch.jit.ScriptModule):
        raise UnsupportedModel(
            "distill.features reads layers of TorchScript models: the teacher and the student must both be TorchScript"
        )
    if options.pairs is not None:
        pairs, chosen = [tuple(pair) for pair in options.pairs], "named (distill.features.pairs)"
    else:
        pairs = [(layer, layer) for layer in default_layers(teacher, probe)]
        chosen = (
            "matched by name in the width student: the last conv layer of each stage"
            f" (at most {MAX_DEFAULT_HINTS}, the deepest)"
        )
    student_shapes = _shapes(student, [s for s, _ in pairs], probe, "student")
    teacher_shapes = _shapes(teacher, [t for _, t in pairs], probe, "teacher")
    return [
        HintPair(s, t, student_shapes[s], teacher_shapes[t], _channel_axis(s, t, student_shapes[s], teacher_shapes[t]))
        for s, t in pairs
    ], chosen


def default_layers(teacher: torch.jit.ScriptModule, probe: Inputs) -> list[str]:
    """A width student's hint layers, named in the teacher (the student has the same names)."""
    with quiet_torchscript_warnings():
        graph = teacher.inlined_graph
    found, _ = readable_layers(teacher, graph)
    types = module_types(teacher)
    convs = [name for name in found if types.get(name) in CONV_TYPES]
    # Without convs: the linear layers but the last, the classifier (its scores are the logit loss's).
    candidates = convs or [name for name in found if types.get(name) == "Linear"][:-1]
    if not candidates:
        raise UnsupportedModel(
            "distill.features found no conv layer, nor a linear layer before the classifier, "
            "whose output can be read in the teacher, to match in the width student; name the "
            "layers with distill.features.pairs"
        )
    shapes = _shapes(teacher, candidates, probe, "teacher")
    stages: list[list[str]] = []
    for name in candidates:  # in the order they run
        if stages and _position(stages[-1][-1], shapes, bool(convs)) == _position(name, shapes, bool(convs)):
            stages[-1].append(name)
        else:
            stages.append([name])
    return [stage[-1] for stage in stages][-MAX_DEFAULT_HINTS:]


class Hints(nn.Module):
    """The hint pairs on one teacher and one student (the training copies): readers and projections."""

    def __init__(
        self,
        pairs: list[HintPair],
        teacher: torch.jit.ScriptModule,
        student: torch.jit.ScriptModule,
        device: torch.device,
        seed: int,
    ) -> None:
        super().__init__()
        self.pairs = pairs
        self.teacher_reader = LayerReader(teacher, [pair.teacher for pair in pairs])
        self.student_reader = LayerReader(student, [pair.student for pair in pairs])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projections = nn.ModuleList([_projection(pair) for pair in pairs]).to(device)

    def teacher(self, *inputs: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        return self.teacher_reader(*inputs)

    def student(self, *inputs: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        return self.student_reader(*inputs)

    def loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
        losses = []
        for pair, projection, mine, target in zip(self.pairs, self.projections, student_features, teacher_features):
            projected = _project(projection, mine.float(), pair.axis)
            target = target.detach().float()
            losses.append(F.mse_loss(projected, target) / target.pow(2).mean().clamp(min=1e-8))
        return torch.stack(losses).mean()

    def report(self) -> list[dict[str, Any]]:
        return [pair.describe(projection) for pair, projection in zip(self.pairs, self.projections)]


# ---------------------------------------------------------------------------- helpers


def _shapes(model: torch.jit.ScriptModule, layers: list[str], probe: Inputs, role: str) -> dict[str, tuple[int, ...]]:
    try:
        reader = LayerReader(model, layers)
    except KeyError as missing:
        with quiet_torchscript_warnings():
            found, refused = readable_layers(model, model.inlined_graph)
        raise InvalidInput(
            f"distill.features.pairs: {unreadable_reason(missing.args[0], list(found), refused, role)}"
        ) from None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, features = reader(*probe)
    finally:
        model.train(training)
    return {layer: tuple(feature.shape) for layer, feature in zip(layers, features)}


def _position(name: str, shapes: dict[str, tuple[int, ...]], conv: bool) -> tuple[int, ...]:
    """The sizes of a layer's output besides the batch and channel axes (a conv stage's spatial size)."""
    return shapes[name][2:] if conv else shapes[name][:-1]


def _channel_axis(student: str, teacher: str, mine: tuple[int, ...], target: tuple[int, ...]) -> int:
    """The axis the projection maps: the one axis where the shapes differ, else the channel axis by rank
    (1 for [batch, channels, ...] images and volumes, the last for [batch, channels] and [batch, tokens, channels])."""
    pair = f"distill.features pair [{student!r}, {teacher!r}]"
    if len(mine) != len(target) or len(mine) < 2 or mine[0] != target[0]:
        raise InvalidInput(
            f"{pair}: the student's output {list(mine)} and the teacher's {list(target)} must have "
            "the same rank (at least 2) and batch size to be compared"
        )
    differ = [axis for axis in range(1, len(mine)) if mine[axis] != target[axis]]
    if len(differ) > 1:
        raise InvalidInput(
            f"{pair}: the student's output {list(mine)} and the teacher's {list(target)} differ in "
            f"axes {differ}; a projection maps one (channel) axis, so the others must agree"
        )
    if differ:
        return differ[0]
    return 1 if len(mine) >= 4 else len(mine) - 1


def _projection(pair: HintPair) -> nn.Module:
    channels_in, channels_out = pair.student_shape[pair.axis], pair.teacher_shape[pair.axis]
    if len(pair.student_shape) == 4 and pair.axis == 1:
        return nn.Conv2d(channels_in, channels_out, kernel_size=1)
    return nn.Linear(channels_in, channels_out)


def _project(projection: nn.Module, features: torch.Tensor, axis: int) -> torch.Tensor:
    if isinstance(projection, nn.Conv2d):
        return projection(features)
    return projection(features.movedim(axis, -1)).movedim(-1, axis)
