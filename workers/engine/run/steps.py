"""Running single-method steps in order, and the report sections they leave."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelpress.options import Step
from workers.engine.inputs import Dataset
from workers.engine.measure import count_parameters, output_fidelity, run_model, significant
from workers.engine.methods.registry import method_entry
from workers.engine.run.prepare import Prepared, Progress
from workers.engine.run.verdict import warnings_for

# After each step of a pipeline: may stop the run (search: the target is already missed) by returning a reason.
StepCheck = Callable[[int, Any], "str | None"]


def run_steps(
    model: Any,
    steps: Sequence[Step],
    prepared: Prepared,
    progress: Progress,
    student: Any | None = None,
    data: Dataset | None = None,
    check: StepCheck | None = None,
    file_name: str = "model.pt",
    float_copy: Path | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run single-method steps in order, each on the model the one before saved (and loaded back).

    Every step trains and calibrates on ``data`` (default: the job's examples). Returns the last
    model and one report section per step; ``check`` may end the run after a step (the section
    then says why, under ``stopped``). ``float_copy``: where the model is saved before a last step
    that quantizes to int8 (export targets quantize that float model with their own tooling).
    """
    data = data or prepared.examples
    form = prepared.form
    sections: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-steps-") as directory:
        for index, step in enumerate(steps):
            name = step.method
            label = f"step {index + 1}/{len(steps)} {name}: " if len(steps) > 1 else ""
            started = time.perf_counter()
            extras = {"student": student} if name == "distill" and student is not None else {}
            if (
                float_copy is not None
                and index + 1 == len(steps)
                and name == "quantize"
                and step.options.dtype == "qint8"
            ):
                form.save(model, float_copy)
            model, details = method_entry(form.name, name)(
                model,
                step.options,
                data,
                lambda stage, fraction, i=index: progress(
                    f"{label}{stage}", (i + min(max(fraction, 0.0), 1.0)) / len(steps)
                ),  # noqa: B023  called only within this step
                **extras,
            )
            if index + 1 < len(steps):
                # The next step gets what a user would download after this one: a saved, reloaded file.
                # Named as the output will be: torch.jit.save stores the file's name inside the archive.
                path = Path(directory) / f"step{index}" / file_name
                path.parent.mkdir()
                size = form.save(model, path)
                model = form.load(path)
                runnable = form.runnable(model)
                candidate = [run_model(runnable, inputs) for inputs in prepared.checks]
                sections.append(
                    {
                        "method": name,
                        name: step.options_json(),
                        "bytes": size,
                        "size_ratio": significant(size / prepared.model_path.stat().st_size),
                        "parameters": count_parameters(runnable),
                        "fidelity": output_fidelity(prepared.reference, candidate),
                        "time_s": round(time.perf_counter() - started, 3),
                        "details": details,
                    }
                )
            else:  # the last step's file is the output, which the caller saves and measures (finish_sections)
                sections.append(
                    {
                        "method": name,
                        name: step.options_json(),
                        "details": details,
                        "time_s": round(time.perf_counter() - started, 3),
                    }
                )
            reason = check(index, model) if check is not None else None
            if reason is not None:
                sections[-1]["stopped"] = reason
                break
    return model, sections


def finish_sections(sections: list[dict[str, Any]], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The last step's section takes its file's figures from the report of the output (the same file)."""
    sections[-1].update(
        {
            "bytes": report["size"]["bytes_after"],
            "size_ratio": report["size"]["ratio"],
            "parameters": report["parameters"]["after"],
            "fidelity": report["fidelity"],
        }
    )
    return sections


def step_warnings(steps: Sequence[Step], sections: Sequence[Mapping[str, Any]], prepared: Prepared) -> list[str]:
    """The methods' own warnings of each step, named by step (collapse is judged once, on the result)."""
    warnings = []
    for number, (step, section) in enumerate(zip(steps, sections), start=1):
        name = step.method
        for warning in warnings_for(step, section["details"], {}, random_inputs=prepared.data is None):
            warnings.append(f"step {number} ({name}): {warning}")
    return warnings
