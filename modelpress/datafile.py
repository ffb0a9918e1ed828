"""What a ``data`` file holds, read from its headers only, and whether it agrees with the spec.

The API uses this to refuse, at submit, a data file whose inputs contradict the declared ones;
the engine uses the same naming rule when it loads the arrays. Headers only: an ``.npz`` member's
``.npy`` header (never its pickles) and a ``.safetensors`` file's JSON header.

An ``.npz`` is a zip: before ``zipfile`` or ``np.load`` opens one, its directory and the sizes its
entries declare pass the bounds every uploaded zip gets (``modelpress.archive.bounded_entries``), so a
zip that lies about its entry count or expands a thousandfold is refused without being parsed.
"""

from __future__ import annotations

import re
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.archive import ArchiveRejected, bounded_entries
from modelpress.untrusted_json import loads_bounded

MAX_INPUTS = 16
# What an .npz may declare uncompressed when the caller names no limit (the engine, whose job memory
# limit is the real bound); the API passes twice the upload limit, as for models.
MAX_NPZ_BYTES = 64 << 30
NPZ_HINT = "np.savez stores arrays uncompressed; np.savez_compressed of real data compresses a few times"
MAX_SAFETENSORS_HEADER = 16 << 20
_NUMBERED = re.compile(r"^input_(\d{1,3})$")
# numpy / safetensors element types under the names the spec uses; float64 is read as float32.
_NUMPY_DTYPES = {
    "float64": "float32",
    "float32": "float32",
    "float16": "float16",
    "int64": "int64",
    "int32": "int32",
    "bool": "bool",
}
_SAFETENSORS_DTYPES = {
    "F64": "float32",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class DataFileError(ValueError):
    """The data file cannot be read or its arrays are not laid out as inputs; ``str()`` says why."""


class DataFileRefused(DataFileError):
    """The data file is a zip beyond the bounds (directory, entry count, declared sizes): refused unopened."""


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: str  # a spec dtype name (float32, int64, ...) or numpy's name for others


def input_array_names(names: Any) -> list[str]:
    """The arrays that are the model's positional inputs, in order: ``inputs``, or ``input_0``, ``input_1``, ..."""
    names = set(names)
    numbered = sorted((int(m.group(1)), name) for name in names if (m := _NUMBERED.match(name)))
    if "inputs" in names and numbered:
        raise DataFileError("the data file has both 'inputs' and numbered inputs (input_0, ...): keep one form")
    if "inputs" in names:
        return ["inputs"]
    if not numbered:
        found = ", ".join(sorted(names)) or "none"
        raise DataFileError(
            f"the data file has no array named 'inputs' (arrays found: {found}); "
            "a model with several inputs takes input_0, input_1, ..."
        )
    if [index for index, _ in numbered] != list(range(len(numbered))):
        raise DataFileError(
            "numbered inputs must run input_0, input_1, ... without gaps: found "
            + ", ".join(name for _, name in numbered)
        )
    if len(numbered) > MAX_INPUTS:
        raise DataFileError(f"at most {MAX_INPUTS} inputs (input_0 .. input_{MAX_INPUTS - 1})")
    return [name for _, name in numbered]


def dtype_name(dtype: Any) -> str:
    """A numpy dtype under the spec's name (float64 counts as float32: it is converted on loading)."""
    name = np.dtype(dtype).name
    return _NUMPY_DTYPES.get(name, name)


def check_data_archive(path: str | Path, max_uncompressed_bytes: int = MAX_NPZ_BYTES) -> None:
    """Raise ``DataFileRefused`` when the file is a zip (an ``.npz``) beyond the bounds; other files pass."""
    if zipfile.is_zipfile(path):  # reads the end record only
        try:
            bounded_entries(Path(path), max_uncompressed_bytes, NPZ_HINT)
        except ArchiveRejected as rejected:
            raise DataFileRefused(f"the .npz data file is refused: {rejected}") from None


def read_headers(path: str | Path, max_uncompressed_bytes: int = MAX_NPZ_BYTES) -> dict[str, ArrayInfo]:
    """Shapes and element types of every array in an ``.npz`` or ``.safetensors`` file, without reading the data."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            check_data_archive(path, max_uncompressed_bytes)  # before zipfile parses the directory
            return _npz_headers(path)
        return _safetensors_headers(path)
    except DataFileError:
        raise
    except Exception as error:  # damaged files raise many different types
        raise DataFileError(f"the data file could not be read: {str(error)[:300]}") from None


def disagreements(
    arrays: Mapping[str, ArrayInfo], declared: Sequence[Any] | None, from_input_shape: bool = False
) -> dict[str, list[str]]:
    """Where the data file's inputs contradict the declared ones, by spec field; empty when they agree.

    The data file defines the example inputs, so only the batch axis may differ. ``declared``: the
    job's ``InputOptions`` (``shape`` and ``dtype`` of each).
    """
    if not declared:
        return {}
    names = input_array_names(arrays)
    if len(names) != len(declared):
        field = "spec.input_shape" if from_input_shape else "spec.inputs"
        return {field: [f"declares {len(declared)} input(s) but the data file has {len(names)} ({', '.join(names)})"]}
    problems: dict[str, list[str]] = {}
    for index, (name, entry) in enumerate(zip(names, declared)):
        info = arrays[name]
        prefix = "spec.input_shape" if from_input_shape else f"spec.inputs.{index}"
        if list(info.shape[1:]) != list(entry.shape[1:]):
            problems.setdefault(prefix if from_input_shape else f"{prefix}.shape", []).append(
                f"samples of shape {list(entry.shape[1:])} declared, but the data file's '{name}' has samples of "
                f"shape {list(info.shape[1:])} (array shape {list(info.shape)}); only the batch axis may differ"
            )
        if info.dtype != entry.dtype:
            problems.setdefault(prefix if from_input_shape else f"{prefix}.dtype", []).append(
                f"{entry.dtype} declared, but the data file's '{name}' holds {info.dtype}"
            )
    return problems


def _npz_headers(path: Path) -> dict[str, ArrayInfo]:
    arrays: dict[str, ArrayInfo] = {}
    with zipfile.ZipFile(path) as archive:
        for entry in archive.infolist():
            if not entry.filename.endswith(".npy"):
                continue
            with archive.open(entry) as member:
                version = np.lib.format.read_magic(member)
                reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(
                    version
                )
                if reader is None:
                    raise DataFileError(f"'{entry.filename}' has an unsupported .npy format version {version}")
                shape, _, dtype = reader(member)
            arrays[entry.filename[:-4]] = ArrayInfo(tuple(int(n) for n in shape), dtype_name(dtype))
    return arrays


def _safetensors_headers(path: Path) -> dict[str, ArrayInfo]:
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise DataFileError("the data file is neither an .npz archive nor a .safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= MAX_SAFETENSORS_HEADER:
            raise DataFileError("the data file is neither an .npz archive nor a .safetensors file")
        try:
            header = loads_bounded(handle.read(length), max_depth=8)
        except ValueError:
            raise DataFileError("the data file is neither an .npz archive nor a .safetensors file") from None
    if not isinstance(header, dict):
        raise DataFileError("the data file is neither an .npz archive nor a .safetensors file")
    return {
        name: ArrayInfo(tuple(int(n) for n in meta["shape"]), _SAFETENSORS_DTYPES.get(meta["dtype"], meta["dtype"]))
        for name, meta in header.items()
        if name != "__metadata__" and isinstance(meta, dict)
    }
