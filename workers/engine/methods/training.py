"""Training loops on TorchScript modules (they are trainable like nn.Modules)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from workers.engine.errors import InvalidInput
from workers.engine.formats.torchscript import set_training
from workers.engine.inputs import Dataset
from workers.engine.outputs import select_output
from workers.engine.torchscript_graph import quiet_torchscript_warnings

Progress = Callable[[str, float], None]


def finetune(
    model: torch.jit.ScriptModule,
    data: Dataset,
    teacher: torch.jit.ScriptModule,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    after_step: Callable[[], None] | None = None,
    progress: Progress | None = None,
    before_forward: Callable[[], None] | None = None,
    before_step: Callable[[], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_epoch: Callable[[], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Adam on cross-entropy when ``data`` has labels, else on agreement with ``teacher`` (self-distillation).

    Self-distillation loss: ``KL(softmax(teacher) || softmax(student))`` for 2-D scores, mean squared error
    otherwise. Both apply to the output ``data.target_output`` selects (spec ``output``). ``after_step``
    runs after each optimiser step (it re-applies pruning masks); ``before_forward`` before each forward pass and
    ``before_step`` between the backward pass and the optimiser step (quantization-aware training swaps
    fake-quantized weights in and the float ones back there). ``penalty`` (a regularizer of the weights) is
    added to every step's loss, and its mean per epoch reported as ``penalty`` beside the data loss
    ``train_loss``; ``after_epoch`` returns figures added to each epoch's entry. Returns the mean training loss
    of each epoch.
    """
    progress = progress or (lambda stage, fraction: None)
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    batches_per_epoch = max(1, -(-len(data) // batch_size))
    history = []
    set_training(model, True)  # an exported program's module refuses train(): its caller switches it
    set_training(teacher, False)
    with quiet_torchscript_warnings():
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            total, count, penalised = 0.0, 0, 0.0
            for step, start in enumerate(range(0, len(data), batch_size)):
                index = order[start : start + batch_size]
                if index.numel() < 2 and len(data) >= 2:
                    continue  # a batch of one breaks BatchNorm in training mode
                inputs = data.rows(index)
                if before_forward is not None:
                    before_forward()
                outputs = trainable_output(model(*inputs), data)
                if data.labels is not None:
                    loss = F.cross_entropy(outputs, data.labels[index])
                else:
                    with torch.no_grad():
                        targets = select_output(teacher(*inputs), data.target_output)
                    loss = _agreement_loss(outputs, targets)
                extra = penalty() if penalty is not None else None
                optimizer.zero_grad(set_to_none=True)
                (loss if extra is None else loss + extra).backward()
                if before_step is not None:
                    before_step()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total += float(loss.detach()) * index.numel()
                penalised += 0.0 if extra is None else float(extra.detach()) * index.numel()
                count += index.numel()
                progress(f"fine-tuning epoch {epoch + 1}/{epochs}", (epoch + (step + 1) / batches_per_epoch) / epochs)
            history.append({"epoch": epoch + 1, "train_loss": round(total / max(count, 1), 6)})
            if penalty is not None:
                history[-1]["penalty"] = round(penalised / max(count, 1), 6)
            if after_epoch is not None:
                history[-1].update(after_epoch())
    set_training(model, False)
    for parameter in parameters:
        parameter.requires_grad_(False)
    return history


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(kept, held out): a seeded random ``fraction`` of the rows held out (at least 1, leaving at least 2)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    size = min(max(1, round(len(data) * fraction)), len(data) - 2)
    if size < 1:
        raise InvalidInput(f"the data file has {len(data)} samples: too few to hold some out for validation")
    return data.subset(order[size:]), data.subset(order[:size])


def accuracy(model: torch.jit.ScriptModule, data: Dataset, batch_size: int = 256) -> float | None:
    """Top-1 accuracy on ``data`` (None without labels or without 2-D score outputs)."""
    if data.labels is None:
        return None
    correct = 0
    with torch.no_grad(), quiet_torchscript_warnings():
        for start in range(0, len(data), batch_size):
            outputs = select_output(model(*data.rows(slice(start, start + batch_size))), data.target_output)
            if outputs.dim() != 2:
                return None
            correct += int((outputs.argmax(1) == data.labels[start : start + batch_size]).sum())
    return correct / len(data)


def trainable_output(output: object, data: Dataset) -> torch.Tensor:
    """The output the loss applies to (spec ``output``): a float tensor, [batch, classes] when labels are given."""
    chosen = select_output(output, data.target_output)
    if not chosen.is_floating_point():
        raise InvalidInput(
            f"the output training uses holds {chosen.dtype} values, which carry no gradient; "
            "choose a float output with spec.output"
        )
    if data.labels is not None and chosen.dim() != 2:
        raise InvalidInput(
            f"'labels' need class scores [batch, classes] to train on, but the output training uses "
            f"has shape {list(chosen.shape)}; choose another with spec.output or drop the labels"
        )
    return chosen


def _agreement_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if outputs.dim() == 2 and outputs.shape[1] > 1:
        return F.kl_div(F.log_softmax(outputs, dim=1), F.softmax(targets, dim=1), reduction="batchmean")
    return F.mse_loss(outputs, targets)
