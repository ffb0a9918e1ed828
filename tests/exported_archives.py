"""torch.export archives for tests: genuine ones, and crafted ones that carry code for torch.export.load to run."""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch


def save_exported(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True) -> Path:
    """torch.export the model on ``example`` (batch axis dynamic unless told) and torch.export.save it."""
    shapes = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
    torch.export.save(torch.export.export(model.eval(), (example,), dynamic_shapes=shapes), path)
    return path


class _Touch:
    """Unpickling this runs ``touch <marker>``: the payload an attacker would hide in a .pt2."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def code_pickle(marker: Path) -> bytes:
    """A pickle (protocol 2, as torch.save writes) whose loading creates ``marker``."""
    return pickle.dumps(_Touch(marker), protocol=2)


def torch_save_archive(data_pkl: bytes) -> bytes:
    """A torch.save zip archive whose data.pkl is ``data_pkl``."""
    buffer = io.BytesIO()
    torch.save((torch.zeros(1),), buffer)
    return replace_entries(buffer.getvalue(), {"data.pkl": data_pkl})


def replace_entries(archive: bytes, replacements: dict[str, bytes | None]) -> bytes:
    """The zip with entries whose path (below the root folder) is a key replaced, added, or (None) removed."""
    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        root = source.namelist()[0].split("/", 1)[0]
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
            for entry in source.infolist():
                inner = entry.filename[len(root) + 1:]
                if inner not in replacements:
                    target.writestr(entry.filename, source.read(entry))
            for inner, data in replacements.items():
                if data is not None:
                    target.writestr(f"{root}/{inner}", data)
    return out.getvalue()


def with_payload_in_sample_inputs(genuine: Path, marker: Path) -> bytes:
    """The genuine .pt2 whose sample inputs, loaded with weights_only=False on fallback, create ``marker``."""
    return replace_entries(genuine.read_bytes(), {"data/sample_inputs/model.pt": torch_save_archive(code_pickle(marker))})


def with_pickled_weight(genuine: Path, marker: Path) -> bytes:
    """The genuine .pt2 whose first weight is marked use_pickle: torch.load(weights_only=False) of the payload."""
    body = genuine.read_bytes()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return replace_entries(body, {"data/weights/model_weights_config.json": json.dumps(config).encode(),
                                  f"data/weights/{first['path_name']}": torch_save_archive(code_pickle(marker))})


def with_graph_target(genuine: Path, target: str) -> bytes:
    """The genuine .pt2 whose first call in the graph is replaced by ``target`` (e.g. 'torch.os.system')."""
    body = genuine.read_bytes()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        program = json.loads(archive.read(f"{root}/models/model.json"))
    program["graph_module"]["graph"]["nodes"][0]["target"] = target
    return replace_entries(body, {"models/model.json": json.dumps(program).encode()})


def with_shape_expression(genuine: Path, expression: str) -> bytes:
    """The genuine .pt2 (with a dynamic axis) whose first symbolic-shape expression is ``expression``."""
    body = genuine.read_bytes()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        text = archive.read(f"{root}/models/model.json").decode()
    start = text.index('"expr_str": "') + len('"expr_str": "')
    end = text.index('"', start)
    text = text[:start] + json.dumps(expression)[1:-1] + text[end:]
    return replace_entries(body, {"models/model.json": text.encode()})
