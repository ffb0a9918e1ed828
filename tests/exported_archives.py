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
                inner = entry.filename[len(root) + 1 :]
                if inner not in replacements:
                    target.writestr(entry.filename, source.read(entry))
            for inner, data in replacements.items():
                if data is not None:
                    target.writestr(f"{root}/{inner}", data)
    return out.getvalue()


def with_payload_in_sample_inputs(genuine: Path, marker: Path) -> bytes:
    """The genuine .pt2 whose sample inputs, loaded with weights_only=False on fallback, create ``marker``."""
    return replace_entries(
        genuine.read_bytes(), {"data/sample_inputs/model.pt": torch_save_archive(code_pickle(marker))}
    )


def with_pickled_weight(genuine: Path, marker: Path) -> bytes:
    """The genuine .pt2 whose first weight is marked use_pickle: torch.load(weights_only=False) of the payload."""
    body = genuine.read_bytes()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return replace_entries(
        body,
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{first['path_name']}": torch_save_archive(code_pickle(marker)),
        },
    )


def with_program(genuine: Path, change) -> bytes:
    """The genuine .pt2 whose models/model.json, parsed, is passed to ``change`` (which edits it in place)."""
    body = genuine.read_bytes()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        program = json.loads(archive.read(f"{root}/models/model.json"))
    change(program)
    return replace_entries(body, {"models/model.json": json.dumps(program).encode()})


def with_graph_target(genuine: Path, target: str) -> bytes:
    """The genuine .pt2 whose first call in the graph is replaced by ``target`` (e.g. 'torch.os.system')."""

    def change(program: dict) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    return with_program(genuine, change)


def with_guards_code(genuine: Path, guards: list[str]) -> bytes:
    """The genuine .pt2 with ``guards``: ExportedProgram.module() pastes each into a function it execs."""

    def change(program: dict) -> None:
        program["guards_code"] = guards

    return with_program(genuine, change)


def with_higher_order_call(genuine: Path, operator: str, marker: Path, hop: str = "wrap") -> bytes:
    """The genuine .pt2 whose first node becomes ``higher_order.<hop>(<operator>, marker, True, 16)``.

    ``wrap`` calls its callable argument: with ``aten.from_file`` (shared) the call creates ``marker``.
    The node keeps its output name, so the rest of the graph still reads it."""

    def change(program: dict) -> None:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["target"] = f"torch.ops.higher_order.{hop}"
        node["is_hop_single_tensor_return"] = True
        node["inputs"] = [
            {"name": "", "arg": {"as_operator": operator}, "kind": 1},
            {"name": "", "arg": {"as_string": str(marker)}, "kind": 1},
            {"name": "", "arg": {"as_bool": True}, "kind": 1},
            {"name": "", "arg": {"as_int": 16}, "kind": 1},
        ]

    return with_program(genuine, change)


def with_renamed_input(genuine: Path, name: str) -> bytes:
    """The genuine .pt2 whose user input is called ``name`` everywhere (FX writes it into generated code)."""

    def change(program: dict) -> None:
        specs = program["graph_module"]["signature"]["input_specs"]
        old = next(spec["user_input"]["arg"]["as_tensor"]["name"] for spec in specs if "user_input" in spec)
        stack = [program]
        while stack:
            item = stack.pop()
            if item == {"name": old}:  # a TensorArgument: the value's uses, its placeholder, the signature
                item["name"] = name
                continue
            stack.extend(
                value
                for value in (item.values() if isinstance(item, dict) else item)
                if isinstance(value, (dict, list))
            )
            if isinstance(item, dict) and old in item:  # tensor_values, keyed by value name
                item[name] = item.pop(old)

    return with_program(genuine, change)


def with_input_structure(genuine: Path, in_spec: list) -> bytes:
    """The genuine .pt2 whose top-level pytree input spec is ``in_spec`` (torch.export.load parses it)."""

    def change(program: dict) -> None:
        program["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = json.dumps(in_spec)

    return with_program(genuine, change)


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
