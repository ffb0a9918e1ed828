"""Example inputs for a job: the uploaded ``data`` file, or random tensors of ``input_shape``."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .errors import InvalidInput

# Inputs used to compare outputs and time the model; enough for stable statistics, small enough for CPU.
MAX_FIDELITY_ROWS = 256
LATENCY_BATCH_ROWS = 8


@dataclass(frozen=True)
class Dataset:
    """Arrays from a ``data`` file: ``inputs`` (first axis = samples) and optional ``labels``."""

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    synthetic: bool = False  # random inputs made from input_shape, not a user's data


    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def load_dataset(path: str | Path) -> Dataset:
    """Read ``.npz`` (no pickles) or ``.safetensors``; validate ``inputs`` and ``labels``."""
    path = Path(path)
    arrays = _read_arrays(path)
    if "inputs" not in arrays:
        found = ", ".join(sorted(arrays)) or "none"
        raise InvalidInput(f"the data file has no array named 'inputs' (arrays found: {found})")
    inputs = _as_tensor(arrays["inputs"], "inputs")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise InvalidInput("the data file's 'inputs' array is empty; its first axis indexes samples")
    labels = None
    if "labels" in arrays:
        labels = _as_tensor(arrays["labels"], "labels")
        if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
            raise InvalidInput(
                f"'labels' must be one class index per input: got shape {list(labels.shape)} "
                f"for {inputs.shape[0]} inputs"
            )
        if labels.is_floating_point():
            raise InvalidInput("'labels' must hold integer class indices, not floats")
        labels = labels.long()
    return Dataset(inputs=inputs, labels=labels)


def example_batch(spec: Mapping[str, Any], data: Dataset | None) -> torch.Tensor:
    """The batch the model is timed on: the spec's ``input_shape``, else the first rows of ``data``."""
    if spec.get("input_shape"):
        return _random_input(spec["input_shape"], spec.get("seed", 0))
    if data is None:
        raise InvalidInput("either 'input_shape' or a data file is needed to run the model")
    return data.inputs[:LATENCY_BATCH_ROWS]


def fidelity_batches(spec: Mapping[str, Any], data: Dataset | None) -> list[torch.Tensor]:
    """Inputs on which original and compressed outputs are compared."""
    if data is not None:
        rows = data.inputs[:MAX_FIDELITY_ROWS]
        return list(rows.split(max(LATENCY_BATCH_ROWS, 32)))
    shape = list(spec["input_shape"])
    # A few independent random batches of the declared shape, seeded for reproducibility.
    return [_random_input(shape, spec.get("seed", 0) + offset) for offset in range(4)]


def examples(spec: Mapping[str, Any], data: Dataset | None) -> Dataset:
    """The data a method may use: the uploaded file, else random batches of ``input_shape``."""
    if data is not None:
        return data
    return Dataset(inputs=torch.cat(fidelity_batches(spec, None)), synthetic=True)


def _random_input(shape: list[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=generator)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception:
            raise InvalidInput("the data file is neither an .npz archive nor a .safetensors file") from None
    except InvalidInput:
        raise
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise InvalidInput("the data file holds pickled objects, which are refused; store plain numeric arrays") from None
        raise InvalidInput(f"the data file could not be read: {error}") from None
    except Exception as error:  # damaged archives raise many different types
        raise InvalidInput(f"the data file could not be read: {str(error)[:300]}") from None


def _as_tensor(array: np.ndarray, name: str) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"'{name}' must be a numeric array, not dtype {array.dtype}")
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))
