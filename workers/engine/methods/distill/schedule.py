"""Distillation schedules (``distill.schedule``): a width student reached in steps.

With ``steps: k`` and ``student.width: w`` the students have widths ``w ** (i / k)`` of the teacher's
channels (i = 1..k, geometric: each step keeps the same fraction of the one before), each cut from
the one before by structured pruning and distilled from it (teacher -> assistant -> ... -> student).
The epochs are split among the steps, the later steps getting the remainder, so a schedule trains
as many epochs as one step would. Channel counts are rounded at each step, so a group of the final
student can differ by a channel from a width student cut from the teacher directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScheduleStep:
    width: float  # of the teacher's channels
    epochs: int


def schedule_steps(width: float, steps: int, epochs: int) -> list[ScheduleStep]:
    """The students of a schedule, narrowest last, with their share of ``epochs``."""
    share, extra = divmod(epochs, steps)
    return [
        ScheduleStep(
            width=round(width ** (index / steps), 6) if index < steps else width,
            epochs=share + (1 if index > steps - extra else 0),
        )
        for index in range(1, steps + 1)
    ]


def compose_groups(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The channel groups of the final student against the teacher, from each step's pruning report
    (``groups`` and ``left_whole``, each against the step before)."""
    groups: dict[str, dict[str, Any]] = {}
    for pruned in steps:
        for entry in pruned["groups"]:
            before = groups[entry["group"]]["channels_before"] if entry["group"] in groups else entry["channels_before"]
            groups[entry["group"]] = {**entry, "channels_before": before}
    left_whole = [entry for entry in steps[-1]["left_whole"] if entry["group"] not in groups]
    return {"groups": list(groups.values()), "left_whole": left_whole}
