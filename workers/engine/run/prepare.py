"""Preparing a run: load the model and the data, check the inputs fit, measure the original.

What ``prepare`` measured (``Prepared``) is what every later measurement of the job compares with.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.formats import TORCHSCRIPT, model_format
from modelpress.options import JobOptions
from workers.engine.errors import InvalidInput
from workers.engine.formats.registry import FORMATS, ModelFormat
from workers.engine.inputs import (
    Dataset,
    Inputs,
    check_declared,
    check_input_count,
    example_batch,
    examples,
    fidelity_batches,
    integer_range_hint,
    load_dataset,
)
from workers.engine.measure import count_parameters, latency_samples_ms, run_model
from workers.engine.methods.training import accuracy
from workers.engine.outputs import select_output

Progress = Callable[[str, float], None]


def prepare(
    model_path: str | os.PathLike, job: JobOptions, data_path: str | os.PathLike | None, progress: Progress
) -> Prepared:
    """Load the model and the data; check that the example inputs fit the model before any method runs."""
    evaluation = job.evaluation
    form = FORMATS[model_format(Path(model_path))]
    clock = StageClock()
    progress("loading", 0.0)
    with clock("load"):
        original = form.runnable(form.load(model_path))
        data: Dataset | None = load_dataset(data_path) if data_path else None
    if data is not None:
        check_declared(job, data)  # the data file defines the inputs; a declared shape must agree with it
    batch = example_batch(job, data)
    check_input_count(original, batch, from_data=data is not None)
    checks = fidelity_batches(job, data)
    progress("checking inputs", 0.02)
    with clock("measure"):
        try:
            reference = [run_model(original, inputs) for inputs in checks]
            run_model(original, batch)
        except InvalidInput as error:
            raise InvalidInput(f"{error}{integer_range_hint(job, data)}") from None
        if job.output is not None:
            select_output(reference[0], job.output)  # a wrong choice fails now, not after the method ran
        prepared = Prepared(
            Path(model_path),
            form,
            original,
            data,
            batch,
            checks,
            reference,
            examples(job, data),
            evaluation.runs,
            evaluation.warmup,
            evaluation.runtime,
            evaluation.max_seconds,
            clock=clock,
        )
        progress("measuring latency", 0.03)
        prepared.latency_before = latency_of(prepared, original)
        prepared.parameters_before = count_parameters(original)
        if data is not None and prepared.examples.labels is not None:
            prepared.accuracy_before = accuracy(original, prepared.examples)
    return prepared


def latency_of(prepared: Prepared, model: Any) -> list[float]:
    """Latency samples (ms per pass) of ``model``, timed as the job's evaluation settings say."""
    return latency_samples_ms(
        prepared.form.timed(model, prepared.runtime, prepared.batch),
        prepared.batch,
        runs=prepared.runs,
        warmup=prepared.warmup,
        max_seconds=prepared.max_seconds,
    )


class StageClock:
    """Wall seconds spent per stage (load, transform, save, measure), summed over the stage's visits."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._totals[stage] = self._totals.get(stage, 0.0) + time.perf_counter() - start

    def totals(self) -> dict[str, float]:
        return {stage: round(seconds, 3) for stage, seconds in self._totals.items()}


@dataclass
class Prepared:
    """The original model, the inputs every measurement of one job uses, and what was measured on
    the original before any method ran (so a single run can hand the original itself to the method:
    one copy of a big model in memory, not two)."""

    model_path: Path
    form: ModelFormat
    original: Any  # what runs (a ScriptModule, or an exported program's module); None once handed over
    data: Dataset | None  # the uploaded file, if any
    batch: Inputs  # what latency is timed on
    checks: list[Inputs]  # what fidelity is measured on
    reference: list[Any]  # the original's outputs on ``checks``
    examples: Dataset  # what methods train and calibrate on
    runs: int
    warmup: int
    runtime: str  # evaluation.runtime: how latency is measured (eager, compile, aoti)
    max_seconds: float | None  # evaluation.max_seconds: the time budget of each latency measurement
    latency_before: list[float] = field(default_factory=list)  # ms per timed pass of the original
    parameters_before: int = 0
    accuracy_before: float | None = None  # on the examples, when they have labels
    clock: StageClock = field(default_factory=StageClock)

    def hand_over(self) -> Any:
        """What a single run's method transforms. A TorchScript original is handed over itself (it was
        measured already); a .pt2 program is loaded again (the runnable module is not the program)."""
        if self.form.name != TORCHSCRIPT:
            with self.clock("load"):
                return self.form.load(self.model_path)
        model, self.original = self.original, None
        return model


def load_student(path: str | os.PathLike, teacher: ModelFormat) -> Any:
    """An uploaded student, in the form the teacher's format trains (a .pt2 teacher trains a .pt2 student)."""
    student = FORMATS[model_format(Path(path))]
    if student.name != teacher.name:
        raise InvalidInput(
            f"the student is a {student.name} model and the teacher a {teacher.name} one: "
            "upload both in the same format"
        )
    return student.runnable(student.load(path))
