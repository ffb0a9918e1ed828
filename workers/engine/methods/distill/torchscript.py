"""Knowledge distillation: train a small student to reproduce an uploaded teacher.

The teacher supplies soft targets, so unlabelled inputs are enough; labels, when given, add a
cross-entropy term. The student comes from an upload, from torchvision by name, or from the
teacher itself with a fraction of its channels kept (the structured pruning engine).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from modelpress.options import DistillOptions, StudentOptions, method_options
from workers.engine.errors import InvalidInput, NothingToPrune, UnsupportedModel
from workers.engine.formats.torchscript import clone_model, set_training
from workers.engine.inputs import Dataset, describe
from workers.engine.measure import count_parameters, run_model
from workers.engine.methods.distill.features import HintPair, Hints, plan_hints
from workers.engine.methods.distill.schedule import compose_groups, schedule_steps
from workers.engine.methods.prune.torchscript import prune
from workers.engine.methods.training import split
from workers.engine.outputs import select_output
from workers.engine.torchscript_graph import quiet_torchscript_warnings

Progress = Callable[[str, float], None]


def distill(
    teacher: torch.jit.ScriptModule,
    options: DistillOptions,
    data: Dataset,
    progress: Progress | None = None,
    student: torch.jit.ScriptModule | None = None,
    scripted: bool = True,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Train a student on ``data``; return the best epoch's student and the training curve.

    Loss: ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)``,
    plus ``features.weight`` times the hint loss with ``features`` (``features.py``). With ``schedule``
    the width student is reached in steps, each student distilled from the one before (``schedule.py``).
    """
    progress = progress or (lambda stage, fraction: None)
    if data.synthetic:
        raise InvalidInput("distillation needs a data file with an 'inputs' array to train on")
    probe = data.head(2)
    teacher_out = select_output(run_model(teacher, probe), data.target_output)
    if teacher_out.dim() != 2 or not teacher_out.is_floating_point():
        raise UnsupportedModel(
            "distillation needs a teacher whose output (spec.output) is class scores "
            f"[batch, classes]; got {list(teacher_out.shape)} ({teacher_out.dtype})"
        )
    classes = int(teacher_out.shape[1])
    if data.labels is not None and int(data.labels.max()) >= classes:
        raise InvalidInput(f"'labels' go up to {int(data.labels.max())} but the teacher scores {classes} classes")

    labelled = data.labels is not None
    alpha = 1.0 if not labelled else (0.9 if options.alpha is None else float(options.alpha))
    train, validation = split(data, options.val_fraction, options.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def run(teacher_now, student_now, epochs: int, report: Progress) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
        _check_student(student_now, teacher_out, probe, data)
        pairs, chosen = plan_hints(teacher_now, student_now, options.features, probe) if options.features else ([], "")
        trained, curve, best_epoch, stopped_early, hints = _train(
            teacher_now,
            student_now,
            train,
            validation,
            dataclasses.replace(options, epochs=epochs),
            alpha,
            device,
            report,
            pairs,
        )
        return trained, {
            "epochs": curve,
            "best_epoch": best_epoch,
            "stopped_early": stopped_early,
            **(
                {
                    "features": {
                        "pairs": hints,
                        "chosen": chosen,
                        "weight": options.features.weight,
                        "projections": "trained with the student, not part of the result",
                    }
                }
                if options.features
                else {}
            ),
        }

    progress("building the student", 0.02)
    if options.schedule is None:
        student, origin = _build_student(teacher, options.student, student, classes, data, scripted)
        student, outcome = run(
            teacher, student, options.epochs, lambda stage, fraction: progress(stage, 0.05 + 0.9 * fraction)
        )
        schedule = None
    else:
        student, origin, outcome, schedule = _schedule(teacher, options, data, validation, run, progress)
    details = {
        "student": origin,
        "temperature": options.temperature,
        "alpha": alpha,
        "device": device.type,
        "samples": {"train": len(train), "validation": len(validation)},
        **outcome,
        **({"schedule": schedule} if schedule is not None else {}),
        "validation": _evaluate(teacher, student, validation, torch.device("cpu")),
        "notes": []
        if labelled
        else ["no labels: the student learns from the teacher's soft targets alone (alpha 1.0)"],
    }
    return student, details


def _check_student(student, teacher_out: torch.Tensor, probe, data: Dataset) -> None:
    try:
        student_out = select_output(run_model(student, probe), data.target_output)
    except InvalidInput as error:
        raise InvalidInput(f"the student cannot run on the data's inputs: {error}") from None
    if student_out.shape != teacher_out.shape:
        raise InvalidInput(
            f"the student's output shape {list(student_out.shape)} differs from the teacher's "
            f"{list(teacher_out.shape)} on {describe(probe)}"
        )


def _schedule(
    teacher,
    options: DistillOptions,
    data: Dataset,
    validation: Dataset,
    run,
    progress: Progress,
) -> tuple[torch.jit.ScriptModule, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The width student in ``schedule.steps`` steps, each cut from the one before and distilled from it.
    Returns the student, its origin (channels against the teacher), the last step's curve, and every step."""
    width = float(options.student.width)
    steps = schedule_steps(width, options.schedule.steps, options.epochs)
    current, current_width, done = teacher, 1.0, 0
    records: list[dict[str, Any]] = []
    pruned_steps: list[dict[str, Any]] = []
    for index, step in enumerate(steps):
        label = f"schedule step {index + 1}/{len(steps)} (width {step.width:.3g}): "
        progress(f"{label}building the student", 0.05 + 0.9 * done / options.epochs)
        narrowed, pruned = width_student(current, step.width / current_width, data)
        trained, outcome = run(
            current,
            narrowed,
            step.epochs,
            lambda stage, fraction, start=done, share=step.epochs, label=label: progress(
                label + stage, 0.05 + 0.9 * (start + fraction * share) / options.epochs
            ),
        )
        records.append(
            {
                "step": index + 1,
                "role": "student" if index + 1 == len(steps) else "assistant",
                "width": step.width,
                "distilled_from": "teacher" if index == 0 else f"step {index}",
                "epoch_budget": step.epochs,
                "parameters": count_parameters(trained),
                "groups": pruned["groups"],
                "left_whole": pruned["left_whole"],
                **outcome,
                "validation": _evaluate(current, trained, validation, torch.device("cpu")),
            }
        )
        pruned_steps.append(pruned)
        current, current_width, done = trained, step.width, done + step.epochs
    origin = {"from": "width", "width": width, **compose_groups(pruned_steps)}
    last = {
        key: value for key, value in records[-1].items() if key in ("epochs", "best_epoch", "stopped_early", "features")
    }
    schedule = {
        "widths": [step.width for step in steps],
        "epoch_budget": [step.epochs for step in steps],
        "agreement": "each step's curve and validation agreement are against the model it is distilled "
        "from; the report's validation is against the teacher",
        "steps": records,
    }
    return current, origin, last, schedule


# ---------------------------------------------------------------------------- students


def _build_student(
    teacher, student_options: StudentOptions, uploaded, classes: int, data: Dataset, scripted: bool
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    source = student_options.source  # "from" in JSON
    if source == "upload":
        if uploaded is None:
            raise InvalidInput("student.from is 'upload' but no student model was uploaded")
        return uploaded, {"from": "upload"}
    if source == "torchvision":
        arch = str(student_options.arch)
        return _torchvision_student(arch, classes, scripted), {"from": "torchvision", "arch": arch}
    width = float(student_options.width)
    narrowed, details = width_student(teacher, width, data)
    return narrowed, {"from": "width", "width": width, "groups": details["groups"], "left_whole": details["left_whole"]}


def width_student(teacher: torch.jit.ScriptModule, width: float, data: Dataset) -> tuple[torch.jit.ScriptModule, dict]:
    """A copy of ``teacher`` with ``width`` of the channels of each group (structured pruning's analysis)."""
    try:
        return prune(clone_model(teacher), method_options("prune", {"amount": 1.0 - width, "structured": True}), data)
    except NothingToPrune as error:
        raise NothingToPrune(f"no channel group of the teacher can be narrowed for a width student: {error}") from None


def _torchvision_student(arch: str, classes: int, scripted: bool) -> torch.jit.ScriptModule | torch.nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise InvalidInput(f"unknown torchvision classification model {arch!r}; choose one of: {', '.join(available)}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes)
    if not scripted:  # for a .pt2 teacher: trained eagerly, then exported
        return model.eval()
    with quiet_torchscript_warnings():
        return torch.jit.script(model.eval())


# ---------------------------------------------------------------------------- training


def _train(
    teacher,
    student,
    train: Dataset,
    validation: Dataset,
    options: DistillOptions,
    alpha: float,
    device: torch.device,
    progress: Progress,
    hint_pairs: list[HintPair] | None = None,
) -> tuple[torch.jit.ScriptModule, list[dict[str, Any]], int, bool, list[dict[str, Any]] | None]:
    """Train a copy of ``student`` on ``device``; return it (on the CPU, best epoch's weights), the curve,
    the best epoch, whether it stopped early, and the hint pairs as trained (None without hints).
    ``progress`` gets the fraction of this training done."""
    epochs, batch_size, temperature = options.epochs, options.batch_size, options.temperature
    patience = options.early_stopping_patience
    teacher = set_training(clone_model(teacher, device), False)
    student = clone_model(student, device)
    hints = Hints(hint_pairs, teacher, student, device, options.seed) if hint_pairs else None
    hint_weight = float(options.features.weight) if hints is not None and options.features is not None else 0.0
    parameters = [p for p in student.parameters() if p.is_floating_point()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    trained = parameters + (list(hints.parameters()) if hints is not None else [])
    if options.optimizer == "sgd":
        optimizer = torch.optim.SGD(trained, lr=options.lr, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(trained, lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    steps = max(1, math.ceil(len(train) / batch_size))
    curve: list[dict[str, Any]] = []
    best_score, best_epoch, best_state, waited = -1.0, 0, None, 0
    stopped_early = False
    with quiet_torchscript_warnings():
        for epoch in range(1, epochs + 1):
            set_training(student, True)
            order = torch.randperm(len(train), generator=generator)
            total, logit_total, hint_total, count = 0.0, 0.0, 0.0, 0
            for step, start in enumerate(range(0, len(train), batch_size)):
                index = order[start : start + batch_size]
                if index.numel() < 2:
                    continue  # a batch of one breaks BatchNorm in training mode
                inputs = tuple(tensor.to(device) for tensor in train.rows(index))
                with torch.no_grad():
                    taught, teacher_features = hints.teacher(*inputs) if hints is not None else (teacher(*inputs), [])
                    soft_targets = F.softmax(select_output(taught, train.target_output) / temperature, dim=1)
                output, student_features = hints.student(*inputs) if hints is not None else (student(*inputs), [])
                logits = select_output(output, train.target_output)
                loss = (
                    alpha
                    * temperature**2
                    * F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_targets, reduction="batchmean")
                )
                if alpha < 1.0 and train.labels is not None:
                    loss = loss + (1.0 - alpha) * F.cross_entropy(logits, train.labels[index].to(device))
                logit_total += float(loss.detach()) * index.numel()
                if hints is not None:
                    hint_loss = hints.loss(student_features, teacher_features)
                    hint_total += float(hint_loss.detach()) * index.numel()
                    loss = loss + hint_weight * hint_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * index.numel()
                count += index.numel()
                progress(f"epoch {epoch}/{epochs}", ((epoch - 1) + (step + 1) / steps) / epochs)
            scores = _evaluate(teacher, student, validation, device)
            losses = {"train_loss": round(total / max(count, 1), 6)}
            if hints is not None:  # the total is the logit loss plus weight x the hint loss
                losses.update(
                    logit_loss=round(logit_total / max(count, 1), 6), hint_loss=round(hint_total / max(count, 1), 6)
                )
            curve.append({"epoch": epoch, **losses, **scores})
            score = scores["accuracy"] if scores["accuracy"] is not None else scores["agreement"]
            if score > best_score:
                best_score, best_epoch, waited = score, epoch, 0
                best_state = {name: t.detach().clone() for name, t in _state(student).items()}
            else:
                waited += 1
                if patience and waited >= int(patience):
                    stopped_early = True
                    break
    if best_state is not None:
        with torch.no_grad():
            for name, tensor in _state(student).items():
                tensor.copy_(best_state[name])
    for parameter in parameters:
        parameter.requires_grad_(False)
    report = hints.report() if hints is not None else None
    return set_training(clone_model(student, "cpu"), False), curve, best_epoch, stopped_early, report


def _evaluate(teacher, student, data: Dataset, device: torch.device) -> dict[str, float | None]:
    set_training(student, False)
    agree, correct = 0, 0
    with torch.no_grad(), quiet_torchscript_warnings():
        for start in range(0, len(data), 256):
            inputs = tuple(tensor.to(device) for tensor in data.rows(slice(start, start + 256)))
            predicted = select_output(student(*inputs), data.target_output).argmax(1)
            agree += int((predicted == select_output(teacher(*inputs), data.target_output).argmax(1)).sum())
            if data.labels is not None:
                correct += int((predicted.cpu() == data.labels[start : start + 256]).sum())
    return {
        "agreement": round(agree / len(data), 6),
        "accuracy": round(correct / len(data), 6) if data.labels is not None else None,
    }


def _state(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}
