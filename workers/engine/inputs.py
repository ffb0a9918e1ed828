"""Example inputs for a job: the uploaded ``data`` file, or random tensors of the declared inputs.

A model takes one or more positional inputs, so example inputs are tuples of tensors whose first
axis indexes samples. The spec declares them with ``inputs`` (shape and dtype of each) or
``input_shape`` (one float32 input); a data file carries them as ``inputs`` or ``input_0``,
``input_1``, ... with their own dtypes, and when one is uploaded it defines the examples.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.datafile import ArrayInfo, DataFileError, check_data_archive, disagreements, input_array_names
from modelpress.options import InputOptions, JobOptions
from modelpress.spec import INT_DTYPES
from workers.engine.errors import InvalidInput

# Inputs used to compare outputs and time the model; enough for stable statistics, small enough for CPU.
MAX_FIDELITY_ROWS = 256
LATENCY_BATCH_ROWS = 8
FIDELITY_BATCH_ROWS = 32

Inputs = tuple[torch.Tensor, ...]  # one tensor per positional input of forward


@dataclass(frozen=True)
class Dataset:
    """Example inputs (first axis = samples), optional ``labels``, and the output training targets.

    ``inputs`` is a tuple with one tensor per positional input (a single tensor is accepted and
    wrapped). ``target_output`` is the spec's ``output``: which output labels and agreement losses
    apply to (None: the first tensor).
    """

    inputs: Inputs
    labels: torch.Tensor | None = None
    synthetic: bool = False  # random inputs made from the declared shapes, not a user's data
    target_output: int | str | None = None

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, torch.Tensor) else tuple(self.inputs)
        object.__setattr__(self, "inputs", inputs)

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def rows(self, index: Any) -> Inputs:
        """The same rows (an index tensor or a slice) of every input."""
        return tuple(tensor[index] for tensor in self.inputs)

    def head(self, count: int) -> Inputs:
        return self.rows(slice(0, count))

    def exactly(self, count: int) -> Inputs:
        """A batch of ``count`` rows: the first rows, the first one repeated when there are fewer."""
        return tuple(
            t if t.shape[0] >= count else t[:1].expand(count, *t.shape[1:]).contiguous() for t in self.head(count)
        )

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(
            self.rows(index), None if self.labels is None else self.labels[index], self.synthetic, self.target_output
        )


def load_dataset(path: str | Path) -> Dataset:
    """Read ``.npz`` (no pickles) or ``.safetensors``; validate the inputs and ``labels``."""
    path = Path(path)
    arrays = _read_arrays(path)
    try:
        names = input_array_names(arrays)
    except DataFileError as error:
        raise InvalidInput(str(error)) from None
    inputs = tuple(_as_tensor(arrays[name], name) for name in names)
    for name, tensor in zip(names, inputs):
        if tensor.dim() < 1 or tensor.shape[0] == 0:
            raise InvalidInput(f"the data file's '{name}' array is empty; its first axis indexes samples")
    if len({int(tensor.shape[0]) for tensor in inputs}) > 1:
        raise InvalidInput(
            "every input needs one row per sample: the data file has "
            + ", ".join(f"{name} {list(t.shape)}" for name, t in zip(names, inputs))
        )
    samples = int(inputs[0].shape[0])
    labels = None
    if "labels" in arrays:
        labels = _as_tensor(arrays["labels"], "labels")
        if labels.dim() != 1 or labels.shape[0] != samples:
            raise InvalidInput(
                f"'labels' must be one class index per input: got shape {list(labels.shape)} for {samples} inputs"
            )
        if labels.is_floating_point():
            raise InvalidInput("'labels' must hold integer class indices, not floats")
        labels = labels.long()
    return Dataset(inputs=inputs, labels=labels)


def check_declared(job: JobOptions, data: Dataset) -> None:
    """Refuse a data file that contradicts the declared inputs (count, dtypes, non-batch dimensions).

    The API checks the same at submit from the file's headers; this covers other callers.
    """
    arrays = _array_infos(data)
    problems = disagreements(arrays, job.inputs, from_input_shape=job.from_input_shape)
    if problems:
        raise InvalidInput(
            "the data file and the spec disagree: "
            + "; ".join(f"{field}: {' '.join(messages)}" for field, messages in problems.items())
        )


def example_batch(job: JobOptions, data: Dataset | None) -> Inputs:
    """The batch the model is timed on: the first rows of ``data``, else random inputs as declared."""
    if data is not None:
        return data.head(LATENCY_BATCH_ROWS)
    return random_inputs(_declared_or_fail(job), job.seed)


def fidelity_batches(job: JobOptions, data: Dataset | None) -> list[Inputs]:
    """Inputs on which original and compressed outputs are compared."""
    if data is not None:
        rows = min(len(data), MAX_FIDELITY_ROWS)
        return [
            data.rows(slice(start, min(start + FIDELITY_BATCH_ROWS, rows)))
            for start in range(0, rows, FIDELITY_BATCH_ROWS)
        ]
    declared = _declared_or_fail(job)
    # A few independent random batches of the declared shapes, seeded for reproducibility.
    return [random_inputs(declared, job.seed + offset) for offset in range(4)]


def examples(job: JobOptions, data: Dataset | None) -> Dataset:
    """The data a method may use: the uploaded file, else random batches of the declared inputs."""
    if data is not None:
        return Dataset(data.inputs, data.labels, data.synthetic, job.output)
    batches = fidelity_batches(job, None)
    inputs = tuple(torch.cat(parts) for parts in zip(*batches))
    return Dataset(inputs=inputs, synthetic=True, target_output=job.output)


def random_inputs(declared: Sequence[InputOptions], seed: int) -> Inputs:
    """One random tensor per declared input: floats standard normal (uniform in [low, high) when
    given), integers uniform in [low, high), bools fair coin flips."""
    generator = torch.Generator().manual_seed(int(seed))
    tensors = []
    for entry in declared:
        shape, dtype = list(entry.shape), getattr(torch, entry.dtype)
        low, high = entry.low, entry.high
        if entry.dtype == "bool":
            tensor = torch.randint(0, 2, shape, generator=generator).bool()
        elif entry.dtype in INT_DTYPES:
            tensor = torch.randint(int(low), int(high), shape, generator=generator, dtype=dtype)
        elif low is None or high is None:
            tensor = torch.randn(*shape, generator=generator).to(dtype)
        else:
            tensor = (torch.rand(*shape, generator=generator) * (float(high) - float(low)) + float(low)).to(dtype)
        tensors.append(tensor)
    return tuple(tensors)


def describe(inputs: Inputs) -> str:
    """``shape [2, 5] (torch.int64)``, or one such phrase per input."""
    if len(inputs) == 1:
        return f"an input of shape {list(inputs[0].shape)} ({inputs[0].dtype})"
    return "inputs of shapes " + ", ".join(f"{list(t.shape)} ({t.dtype})" for t in inputs)


def integer_range_hint(job: JobOptions, data: Dataset | None) -> str:
    """When random integer inputs may be out of the model's range, how to set it; else ''."""
    if data is not None:
        return ""
    entries = job.inputs if job.inputs and not job.from_input_shape else ()
    ranges = [
        f"spec.inputs.{index} is random in [{entry.low}, {entry.high})"
        for index, entry in enumerate(entries)
        if entry.dtype in INT_DTYPES
    ]
    if not ranges:
        return ""
    return (
        f" ({'; '.join(ranges)}: set low/high to the values the model accepts, e.g. high = vocabulary size, "
        "or upload a data file)"
    )


def check_input_count(model: torch.jit.ScriptModule, inputs: Inputs, from_data: bool) -> None:
    """Refuse, with the parameter names, example inputs that do not match ``forward``'s positional inputs."""
    try:
        arguments = [a for a in model.forward.schema.arguments[1:] if not a.kwarg_only]  # [0] is self
    except (AttributeError, RuntimeError):
        return  # no schema to read: running the model will say what is wrong
    required = [a for a in arguments if not a.has_default_value()]
    if len(required) <= len(inputs) <= len(arguments):
        return
    given = (
        f"the data file has {len(inputs)} (inputs, or input_0, input_1, ...)"
        if from_data
        else f"the spec declares {len(inputs)}"
    )
    raise InvalidInput(
        f"the model's forward takes {len(required)} input(s) "
        f"({', '.join(a.name for a in arguments)}) but {given}: give one per input, "
        "with spec.inputs or a data file's input_0, input_1, ..."
    )


def _declared_or_fail(job: JobOptions) -> Sequence[InputOptions]:
    declared = job.inputs
    if not declared:
        raise InvalidInput("either 'input_shape', 'inputs' or a data file is needed to run the model")
    return declared


def _array_infos(data: Dataset) -> dict[str, ArrayInfo]:
    names = ["inputs"] if len(data.inputs) == 1 else [f"input_{i}" for i in range(len(data.inputs))]
    return {name: ArrayInfo(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in zip(names, data.inputs)}


def _read_arrays(path: Path) -> dict[str, np.ndarray | torch.Tensor]:
    try:
        if zipfile.is_zipfile(path):
            check_data_archive(path)  # np.load parses the whole zip directory, whatever it declares
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        from safetensors.torch import load_file  # torch, not numpy: keeps bfloat16

        try:
            return dict(load_file(str(path)))
        except Exception:
            raise InvalidInput("the data file is neither an .npz archive nor a .safetensors file") from None
    except InvalidInput:
        raise
    except DataFileError as error:  # refused by the zip bounds
        raise InvalidInput(str(error)) from None
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise InvalidInput(
                "the data file holds pickled objects, which are refused; store plain numeric arrays"
            ) from None
        raise InvalidInput(f"the data file could not be read: {error}") from None
    except Exception as error:  # damaged archives raise many different types
        raise InvalidInput(f"the data file could not be read: {str(error)[:300]}") from None


def _as_tensor(array: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.float() if array.dtype == torch.float64 else array
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"'{name}' must be a numeric array, not dtype {array.dtype}")
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))
