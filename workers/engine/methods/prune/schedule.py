"""Iterative pruning (``prune.schedule``): reach the amount in steps, fine-tuning after each.

The amount after step ``t`` of ``k`` follows a curve: ``cubic`` is Zhu & Gupta's gradual pruning
schedule (2017), ``amount * (1 - (1 - t/k)^3)``: large steps while many weights are redundant,
small ones near the end, where the network has least to give; ``linear`` is ``amount * t/k``. The
last step is exactly ``amount``, so the result has the one-shot job's sparsity (or channels). The
fine-tuning budget is ``finetune.epochs`` in all, split across the steps (the later steps get the
remainder). A step is what a one-shot job does, on the model the previous step left: unstructured,
the smallest magnitudes of the current weights are zeroed (the earlier zeros are the smallest, so
they stay); structured, each group keeps its share of its *original* channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modelpress.options import PruneOptions
from workers.engine.errors import NothingToPrune

AfterStep = Callable[[], None] | None
# One pruning step: the model pruned to a total amount, its report, what re-applies its masks while training.
PruneStep = Callable[[torch.jit.ScriptModule, float], tuple[torch.jit.ScriptModule, dict[str, Any], AfterStep]]
# Fine-tuning after step ``index``: the per-epoch history.
Train = Callable[[torch.jit.ScriptModule, int, AfterStep, int], list[dict[str, float]]]


def step_amounts(amount: float, steps: int, curve: str) -> list[float]:
    """The total amount after each step; the last is ``amount`` itself."""
    if curve == "cubic":
        amounts = [amount * (1.0 - (1.0 - t / steps) ** 3) for t in range(1, steps + 1)]
    else:
        amounts = [amount * t / steps for t in range(1, steps + 1)]
    amounts[-1] = amount
    return amounts


def split_epochs(epochs: int, steps: int) -> list[int]:
    """``epochs`` shared by ``steps`` fine-tunings, as evenly as whole epochs allow (the extra ones last)."""
    base, extra = divmod(epochs, steps)
    return [base + (1 if index >= steps - extra else 0) for index in range(steps)]


def run_schedule(
    model: torch.jit.ScriptModule,
    options: PruneOptions,
    prune_step: PruneStep,
    train: Train,
    merge: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Prune in ``options.schedule.steps`` steps with fine-tuning after each; the merged report
    (``merge`` of the steps' reports) with ``schedule`` (per step: amount, epochs, losses) and ``finetune``
    (every epoch, numbered across the steps)."""
    schedule, training = options.schedule, options.finetune
    assert schedule is not None and training is not None
    amounts = step_amounts(options.amount, schedule.steps, schedule.curve)
    epochs = split_epochs(training.epochs, schedule.steps)
    reports, steps, history = [], [], []
    unused = 0  # epochs of steps that removed nothing carry over to the next one
    for index, (amount, count) in enumerate(zip(amounts, epochs)):
        last = index == len(amounts) - 1
        record: dict[str, Any] = {"step": index + 1, "amount": round(amount, 6)}
        try:
            model, details, after_step = prune_step(model, amount)
            reports.append(details)
            record.update(_achieved(details))
        except NothingToPrune:  # structured: nothing (more) to remove at this amount
            if last and not reports:
                raise  # no step removed anything: the one-shot job's failure
            record["removed"] = "nothing more at this amount"
            after_step = None
            if not last:
                unused += count
                steps.append({**record, "epochs": 0, "finetune": []})
                continue
        count, unused = count + unused, 0
        losses = train(model, count, after_step, index) if count else []
        for entry in losses:
            history.append({**entry, "epoch": len(history) + 1, "step": index + 1})
        steps.append({**record, "epochs": count, "finetune": [entry["train_loss"] for entry in losses]})
    merged = merge(reports)
    merged["schedule"] = {"curve": schedule.curve, "steps": steps, "epochs": sum(step["epochs"] for step in steps)}
    merged["finetune"] = history
    return model, merged


def _achieved(details: dict[str, Any]) -> dict[str, Any]:
    if details.get("structured"):
        return {"channels_after": details["channels"]["after"]}
    return {"sparsity": details["sparsity"]}


def merge_channel_reports(reports: list[dict[str, Any]], kept: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One structured report for the steps: each group's channels before the first step and after the
    last, heads by their original index (``kept``: each group's original channel indices still there),
    and left whole only what no step pruned."""
    groups: dict[str, dict[str, Any]] = {}
    for report in reports:
        seen: dict[str, int] = {}
        for entry in report["groups"]:
            seen[entry["group"]] = seen.get(entry["group"], 0) + 1  # keys as methods.prune.torchscript.group_keys
            key = entry["group"] if seen[entry["group"]] == 1 else f"{entry['group']}#{seen[entry['group']]}"
            merged = dict(entry)
            if key in groups:
                merged["channels_before"] = groups[key]["channels_before"]
            if "heads" in merged and key in kept:
                width = merged["heads"]["width"]
                merged["heads"] = {
                    "width": width,
                    "before": merged["channels_before"] // width,
                    "kept": sorted({int(channel) // width for channel in kept[key]}),
                }
            groups[key] = merged
    final = dict(reports[-1])
    before = reports[0]["channels"]["before"]
    final["groups"] = list(groups.values())
    pruned = {entry["group"] for entry in groups.values()}
    final["left_whole"] = [entry for entry in final["left_whole"] if entry["group"] not in pruned]
    final["channels"] = {
        "before": before,
        "after": before - sum(g["channels_before"] - g["channels_after"] for g in groups.values()),
    }
    if any("heads" in entry for entry in groups.values()):
        final["heads_kept"] = {key: entry["heads"]["kept"] for key, entry in groups.items() if "heads" in entry}
    return final
