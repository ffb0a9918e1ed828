"""The search toward a target: try candidates, judge each on held-out rows, keep the best that meets the target.

A candidate is a list of single-method steps (``modelpress.options.Step``). ``auto`` tries
methods and pipelines of them; a pipeline with a target keeps its steps and tunes their amounts
(``prune.amount``, ``distill.student.width``). Candidates come in *ladders*, cheapest first, each
ladder ordered from mild to aggressive: once a rung misses the target the harsher rungs are
skipped, and a pipeline whose early step already misses stops there (later steps only lose more).

The data file is split once: ``search.holdout`` of its rows are held out and judged on, the rest
is what every step trains and calibrates on.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelpress.method_specs import SEARCH_RUNTIMES
from modelpress.options import JobOptions, Step, TargetOptions, step
from modelpress.spec import PIPELINE
from workers.engine.errors import CompressionError, InvalidInput, TargetNotMet, is_out_of_memory, summarize_torch_error
from workers.engine.formats.torchscript import clone_model
from workers.engine.inputs import Dataset
from workers.engine.measure import count_macs, median_latency_ms, output_fidelity, run_model
from workers.engine.methods.training import accuracy
from workers.engine.outputs import select_output
from workers.engine.run.prepare import Prepared, Progress
from workers.engine.run.report import measure_result
from workers.engine.run.steps import finish_sections, run_steps, step_warnings
from workers.engine.run.targets import failure_reason, make_target

MIN_HOLDOUT_ROWS = 10
MIN_TRAINING_ROWS = 10
PRUNE_AMOUNTS = (0.3, 0.5, 0.7, 0.85)
DISTILL_WIDTHS = (0.5, 0.33, 0.25)
FINETUNE = {"epochs": 5, "lr": 2e-3, "batch_size": 64, "seed": 0}  # as a spec gives it
_DYNAMIC_TYPES = {"Linear", "LSTM", "GRU", "NonDynamicallyQuantizableLinear"}
_STATIC_TYPES = {"Conv1d", "Conv2d", "Conv3d", "Linear"}
_OBJECTIVE_KEYS = {"size": "bytes", "latency": "latency_ms", "macs": "macs"}


@dataclass
class _Judge:
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


@dataclass
class _Candidate:
    label: str
    steps: list[Step]
    ladder: str
    trial: dict[str, Any] = field(default_factory=dict)


def search(
    prepared: Prepared,
    job: JobOptions,
    output_path: str | os.PathLike,
    progress: Progress,
    student: torch.jit.ScriptModule | None,
) -> dict[str, Any]:
    """Run the search; write the chosen candidate to ``output_path`` and return the report (or raise TargetNotMet)."""
    target, options = job.target, job.search
    assert target is not None and options is not None  # job.searching
    if prepared.data is None:
        raise InvalidInput("a target needs a data file: the search judges candidates on held-out rows of it")
    training, holdout = _split(prepared.examples, options.holdout, options.seed)
    judge = _judge(prepared, target, holdout)
    objective = _OBJECTIVE_KEYS[target.objective]
    runtime = SEARCH_RUNTIMES[target.runtime] if target.objective == "latency" else None  # an export target, or None
    ladders = list(_candidates(job, prepared.form.layer_types(prepared.original), training))
    max_trials, budget = options.max_trials, float(options.time_budget_s)
    trials: list[dict[str, Any]] = []
    missed_ladders: set[str] = set()
    started = time.monotonic()
    chosen: _Candidate | None = None
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-search-") as directory:
        for candidate in ladders:
            if len(trials) >= max_trials:
                notes.append(f"stopped after max_trials={max_trials} trials")
                break
            if time.monotonic() - started >= budget:
                notes.append(f"stopped: the time budget of {budget:g} s was spent")
                break
            if candidate.ladder in missed_ladders:
                continue  # a milder rung of this ladder already missed the target
            number = len(trials) + 1
            (Path(directory) / f"trial{number}").mkdir()
            trial = _try(
                candidate,
                number,
                max_trials,
                prepared,
                training,
                judge,
                student,
                Path(directory) / f"trial{number}" / Path(output_path).name,
                progress,
                runtime,
            )
            trials.append(trial)
            candidate.trial = trial
            if not trial["meets_target"]:
                missed_ladders.add(candidate.ladder)
            elif chosen is None or _better(trial, chosen.trial, objective):
                chosen = candidate
        else:
            notes.append("every candidate was tried or skipped")
        front = _pareto_front(trials, objective)
        summary = {
            "metric": target.metric,
            **{k: getattr(target, k) for k in ("max_drop", "min") if getattr(target, k) is not None},
            "objective": target.objective,
            "baseline": round(judge.baseline, 6),
            "threshold": round(judge.threshold, 6),
            "holdout_rows": len(holdout),
            "training_rows": len(training),
        }
        search_facts = {
            **dataclasses.asdict(options),
            "trials": len(trials),
            "elapsed_s": round(time.monotonic() - started, 2),
            "notes": notes,
        }
        if chosen is None:
            best = max((t for t in trials if t.get("metric") is not None), key=lambda t: t["metric"], default=None)
            closest = (
                f"; the closest was trial {best['trial']} ({best['label']}) at {best['metric']:.4f}" if best else ""
            )
            raise TargetNotMet(
                f"no candidate kept {target.metric} at or above {judge.threshold:.4f} on the {len(holdout)} held-out "
                f"rows (original: {judge.baseline:.4f}) in {len(trials)} trial(s){closest}; allow a larger drop, "
                "more trials or time, or upload more data",
                {
                    "method": job.method,
                    "target": summary,
                    "search": search_facts,
                    "trials": trials,
                    "pareto_front": front,
                    "chosen": None,
                },
            )
        shutil.copyfile(chosen.trial.pop("_path"), output_path)
        if runtime is not None:  # the chosen candidate's artifact for the runtime it was timed on
            entry = chosen.trial["_target"]
            shutil.copyfile(Path(chosen.trial["_path_target"]), Path(output_path).parent / entry["file"])
    for trial in trials:
        for private in ("_path", "_target", "_path_target"):
            trial.pop(private, None)
    progress("measuring the chosen candidate", 0.9)
    report = measure_result(
        prepared, None, output_path, lambda stage, f: progress(stage, 0.9 + 0.09 * f), judged_on=holdout
    )
    summary["achieved"] = chosen.trial["metric"]
    # With a target the job is judged by it, not by the generic collapse thresholds.
    warnings = (
        step_warnings(chosen.steps, chosen.trial["sections"], prepared)
        if len(chosen.steps) > 1
        else [w for section in chosen.trial["sections"] for w in section["details"].get("warnings", [])]
    )
    if runtime is not None:
        report["targets"] = {runtime: entry}
    return {
        "method": job.method,
        **report,
        "details": {"chosen": chosen.label, "steps": [step.method for step in chosen.steps]},
        "target": summary,
        "search": search_facts,
        "chosen": chosen.trial["trial"],
        "trials": [{k: v for k, v in t.items() if k != "sections"} for t in trials],
        "pareto_front": front,
        "steps": finish_sections(chosen.trial["sections"], report),
        "warnings": warnings,
    }


def _try(
    candidate: _Candidate,
    number: int,
    max_trials: int,
    prepared: Prepared,
    training: Dataset,
    judge: _Judge,
    student: torch.jit.ScriptModule | None,
    path: Path,
    progress: Progress,
    runtime: str | None = None,
) -> dict[str, Any]:
    """One trial: run the steps on the training rows, judge after each step, measure the file.

    ``runtime``: an export target whose runtime the trial is timed on (the candidate exported to
    it, int8 by its own tooling as a job's target is); None: timed in the upload's own format."""
    started = time.perf_counter()
    trial: dict[str, Any] = {"trial": number, "label": candidate.label, "spec": _spec_of(candidate.steps)}
    base = (number - 1) / max_trials
    form = prepared.form  # TorchScript or .pt2: each trial loads, saves and runs the model in its format

    def step_progress(stage: str, fraction: float) -> None:
        progress(
            f"trial {number}/{max_trials} ({candidate.label}): {stage}", 0.05 + 0.85 * (base + fraction / max_trials)
        )

    scores: list[float] = []

    def check(index: int, model: torch.jit.ScriptModule) -> str | None:
        scores.append(judge.score(form.runnable(model)))
        if scores[-1] < judge.threshold and index + 1 < len(candidate.steps):
            return (
                f"{judge.metric} {scores[-1]:.4f} after this step is already under {judge.threshold:.4f}; "
                "the later steps were not run"
            )
        return None

    try:
        # Distillation trains an uploaded student in place: each trial starts from the upload.
        float_copy = path.parent / "float" / path.name if runtime else None
        if float_copy is not None:
            float_copy.parent.mkdir()
        model, sections = run_steps(
            form.load(prepared.model_path),
            candidate.steps,
            prepared,
            step_progress,
            clone_model(student) if student is not None else None,
            data=training,
            check=check,
            file_name=path.name,
            float_copy=float_copy,
        )
    except Exception as error:  # this candidate does not apply to the model; the search goes on
        if is_out_of_memory(error):
            raise  # the next candidate would run out too; the job fails with the memory message
        reason = (
            f"{error.title}: {error}"
            if isinstance(error, CompressionError)
            else f"{type(error).__name__}: {summarize_torch_error(error)}"
        )
        return {
            **trial,
            "error": reason,
            "metric": None,
            "meets_target": False,
            "time_s": round(time.perf_counter() - started, 3),
            "sections": [],
        }
    completed = len(sections) == len(candidate.steps) and "stopped" not in sections[-1]
    size = form.save(model, path)
    reloaded = form.runnable(form.load(path))
    metric = judge.score(reloaded) if completed else scores[-1]
    if runtime is not None and completed:
        try:
            entry = make_target(
                prepared,
                runtime,
                candidate.steps,
                float_copy if float_copy is not None and float_copy.exists() else path,
                path.parent,
            )
        except Exception as error:  # this candidate cannot run on that runtime: it cannot be chosen
            if is_out_of_memory(error):
                raise
            return {
                **trial,
                "error": f"{runtime}: {failure_reason(runtime, error)}",
                "metric": metric,
                "meets_target": False,
                "time_s": round(time.perf_counter() - started, 3),
                "sections": sections,
            }
        latency = float(entry["latency_ms"])
        trial.update({"runtime": entry["runtime"], "_target": entry, "_path_target": str(path.parent / entry["file"])})
    else:
        latency = median_latency_ms(
            form.timed(reloaded, prepared.runtime, prepared.batch),
            prepared.batch,
            runs=prepared.runs,
            warmup=prepared.warmup,
        )
    trial.update(
        {
            "bytes": size,
            "size_ratio": round(size / prepared.model_path.stat().st_size, 5),
            "latency_ms": round(latency, 4),
            "macs": count_macs(reloaded, prepared.batch),
            "metric": metric,
            "metric_after_step": scores,
            "meets_target": completed and metric >= judge.threshold,
            "time_s": round(time.perf_counter() - started, 3),
            "sections": sections,
            "_path": str(path),
        }
    )
    if not completed:
        trial["stopped_early"] = sections[-1]["stopped"]
    return trial


# ---------------------------------------------------------------------------- candidates


def _candidates(job: JobOptions, types: set[str], training: Dataset) -> Iterator[_Candidate]:
    """Candidates cheapest first; within a ladder, milder first. ``types``: the model's layer types."""
    if job.method == PIPELINE:
        yield from _tuned_pipeline(job.steps)
        return
    finetune = dict(FINETUNE)
    if types & _DYNAMIC_TYPES:
        yield _Candidate("quantize dynamic", [step("quantize", {"mode": "dynamic"})], "dynamic")
    if types & _STATIC_TYPES:
        yield _Candidate("quantize static", [step("quantize", {"mode": "static"})], "static")
    for amount in PRUNE_AMOUNTS:
        yield _Candidate(
            f"prune structured {amount} + fine-tune + quantize static",
            [
                step("prune", {"amount": amount, "structured": True, "finetune": finetune}),
                step("quantize", {"mode": "static"}),
            ],
            "prune+static",
        )
    for width in DISTILL_WIDTHS:
        yield _Candidate(
            f"distill width {width} + quantize static",
            [
                step("distill", {"student": {"from": "width", "width": width}, "epochs": 10}),
                step("quantize", {"mode": "static"}),
            ],
            "distill+static",
        )


def _tuned_pipeline(steps: Sequence[Step]) -> Iterator[_Candidate]:
    """The user's steps as given, then with their amounts tuned: one ladder over the prune amount (and width)."""
    tunable = [
        i
        for i, given in enumerate(steps)
        if given.method == "prune" or (given.method == "distill" and given.options.student.source == "width")
    ]
    if not tunable:
        yield _Candidate(_label(steps), list(steps), "as given")
        return
    # Severity 0..1 for each rung: the prune amount, or 1 - the student's width.
    first = steps[tunable[0]]
    own = first.options.amount if first.method == "prune" else 1 - first.options.student.width
    for severity in sorted({round(own, 4), *PRUNE_AMOUNTS}):
        rung = [_with_severity(given, severity) if index in tunable else given for index, given in enumerate(steps)]
        yield _Candidate(_label(rung), rung, "amounts")


def _with_severity(given: Step, severity: float) -> Step:
    """A prune step at ``amount`` = severity, or a width distillation at width 1 - severity."""
    options = given.options
    if given.method == "prune":
        return dataclasses.replace(given, options=dataclasses.replace(options, amount=severity))
    student = dataclasses.replace(options.student, width=round(1 - severity, 4))
    return dataclasses.replace(given, options=dataclasses.replace(options, student=student))


def _spec_of(steps: Sequence[Step]) -> dict[str, Any]:
    """A candidate as the spec that would run it alone (what a user resubmits)."""
    parts = [{"method": given.method, given.method: given.options_json()} for given in steps]
    return {"method": PIPELINE, "steps": parts} if len(parts) > 1 else parts[0]


def _label(steps: Sequence[Step]) -> str:
    parts = []
    for given in steps:
        options = given.options
        if given.method == "prune":
            parts.append(
                f"prune {'structured ' if options.structured else ''}{options.amount:g}"
                + (" + fine-tune" if options.finetune else "")
            )
        elif given.method == "quantize":
            parts.append(f"quantize {options.mode}")
        else:
            student = options.student
            parts.append(f"distill {student.width or student.arch or student.source}")
    return " + ".join(parts)


# ---------------------------------------------------------------------------- judging


def _split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    rows = len(data)
    held = max(MIN_HOLDOUT_ROWS, round(rows * fraction))
    if rows - held < MIN_TRAINING_ROWS:
        raise InvalidInput(
            f"the search needs at least {MIN_HOLDOUT_ROWS + MIN_TRAINING_ROWS} rows in the data file "
            f"({MIN_HOLDOUT_ROWS} held out to judge on, the rest to train on); it has {rows}"
        )
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[held:]), data.subset(order[:held])


def _judge(prepared: Prepared, target: TargetOptions, holdout: Dataset) -> _Judge:
    if target.metric == "accuracy" and holdout.labels is None:
        raise InvalidInput("target metric accuracy needs a 'labels' array in the data file")
    reference = [run_model(prepared.original, batch) for batch in _batches(holdout)]
    judge = _Judge(target.metric, holdout, reference, 1.0, 0.0)
    judge.baseline = judge.score(prepared.original)
    judge.threshold = float(target.min) if target.min is not None else judge.baseline - float(target.max_drop or 0.0)
    return judge


def _batches(data: Dataset, rows: int = 64) -> list[tuple[torch.Tensor, ...]]:
    return [data.rows(slice(start, start + rows)) for start in range(0, len(data), rows)]


def _better(trial: Mapping[str, Any], best: Mapping[str, Any], objective: str) -> bool:
    return (trial[objective], -trial["metric"]) < (best[objective], -best["metric"])


def _pareto_front(trials: list[dict[str, Any]], objective: str) -> list[int]:
    """Trials no other trial beats on both the objective (lower) and the metric (higher)."""
    done = [t for t in trials if t.get("metric") is not None and "stopped_early" not in t and objective in t]
    return [
        t["trial"]
        for t in done
        if not any(
            o is not t
            and o[objective] <= t[objective]
            and o["metric"] >= t["metric"]
            and (o[objective] < t[objective] or o["metric"] > t["metric"])
            for o in done
        )
    ]


__all__ = ["TargetNotMet", "search"]
