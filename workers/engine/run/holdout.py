"""How the search judges a candidate: the data file split once into rows to train on and rows held
out (``split_holdout``), and a ``Judge`` holding the held-out rows, the original's outputs and
score on them, and the bound the target sets (``make_judge``). ``run.search`` uses both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelpress.options import TargetOptions
from workers.engine.errors import InvalidInput
from workers.engine.inputs import Dataset
from workers.engine.measure import output_fidelity, run_model
from workers.engine.methods.training import accuracy
from workers.engine.outputs import select_output
from workers.engine.run.prepare import Prepared

MIN_HOLDOUT_ROWS = 10
MIN_TRAINING_ROWS = 10


@dataclass
class Judge:
    """The held-out rows, the original's outputs on them, and the bound a candidate must keep."""

    metric: str
    holdout: Dataset
    reference: list[Any]
    baseline: float
    threshold: float

    def score(self, model: torch.jit.ScriptModule) -> float:
        if self.metric == "accuracy":
            value = accuracy(model, self.holdout)
            if value is None:
                raise InvalidInput(
                    "target metric accuracy needs class scores [batch, classes] from the output spec.output chooses"
                )
            return value
        outputs = [run_model(model, batch) for batch in _batches(self.holdout)]
        if self.metric == "cosine":
            return float(output_fidelity(self.reference, outputs)["cosine_similarity"])
        agree = total = 0
        for ref, out in zip(self.reference, outputs):
            a, b = select_output(ref, self.holdout.target_output), select_output(out, self.holdout.target_output)
            if a.dim() != 2 or a.shape[1] < 2:
                raise InvalidInput(
                    "target metric top1_agreement needs class scores [batch, classes]; got an output "
                    f"of shape {list(a.shape)} (use cosine, or choose the output with spec.output)"
                )
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            total += int(a.shape[0])
        return agree / max(total, 1)


def split_holdout(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """The rows to train on and the rows held out (``fraction`` of them, drawn with ``seed``)."""
    rows = len(data)
    held = max(MIN_HOLDOUT_ROWS, round(rows * fraction))
    if rows - held < MIN_TRAINING_ROWS:
        raise InvalidInput(
            f"the search needs at least {MIN_HOLDOUT_ROWS + MIN_TRAINING_ROWS} rows in the data file "
            f"({MIN_HOLDOUT_ROWS} held out to judge on, the rest to train on); it has {rows}"
        )
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[held:]), data.subset(order[:held])


def make_judge(prepared: Prepared, target: TargetOptions, holdout: Dataset) -> Judge:
    """The judge of ``target`` on ``holdout``: the original's outputs and score there, and the bound."""
    if target.metric == "accuracy" and holdout.labels is None:
        raise InvalidInput("target metric accuracy needs a 'labels' array in the data file")
    reference = [run_model(prepared.original, batch) for batch in _batches(holdout)]
    judge = Judge(target.metric, holdout, reference, 1.0, 0.0)
    judge.baseline = judge.score(prepared.original)
    judge.threshold = float(target.min) if target.min is not None else judge.baseline - float(target.max_drop or 0.0)
    return judge


def _batches(data: Dataset, rows: int = 64) -> list[tuple[torch.Tensor, ...]]:
    return [data.rows(slice(start, start + rows)) for start in range(0, len(data), rows)]
