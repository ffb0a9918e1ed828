"""Every place torch turns a .pt2's strings into code: each attack is proven real on plain torch, then refused
by the job's own loading path (``load_program`` / ``compress``) with the marker never written; the genuine
archive, and genuine programs of every shape torch.export writes, load and compress."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import re
import sys
import types
import typing
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress import pt2_schema
from modelpress.formats import exported_program_problem
from modelpress.spec import parse_spec
from tests.exported_archives import (
    save_exported,
    with_guards_code,
    with_higher_order_call,
    with_input_structure,
    with_program,
    with_renamed_input,
)
from workers.engine.errors import InvalidModel
from workers.engine.formats.exported import load_program
from workers.engine.run.pipeline import compress

SPEC = {"method": "quantize", "input_shape": [4, 16]}


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    return save_exported(model, torch.randn(4, 16), tmp_path_factory.mktemp("pt2") / "genuine.pt2")


def _spec(body: dict) -> dict:
    return parse_spec(json.dumps({"evaluation": {"runs": 1, "warmup": 0}, **body}), has_data=False, has_student=False)


def _problem(body: bytes, tmp_path: Path) -> str | None:
    path = tmp_path / "checked.pt2"
    path.write_bytes(body)
    return exported_program_problem(path, zipfile.ZipFile(path).namelist())


def _plain_torch_runs(body: bytes, tmp_path: Path, call: bool = True) -> None:
    """What torch alone does with the file: load, build the module, call it (errors after the payload are expected)."""
    path = tmp_path / "plain.pt2"
    path.write_bytes(body)
    with contextlib.suppress(Exception):
        module = torch.export.load(path).module()
        if call:
            module(torch.randn(4, 16))


ATTACKS = {
    # .module() pastes guards_code into a function it execs; the guard runs on every call.
    "guards_code": (
        lambda genuine, marker: with_guards_code(genuine, [f"__import__('os').system('touch {marker}') == 0"]),
        "guard code",
    ),
    # higher_order.wrap calls its callable argument: aten.from_file (shared) creates the file it names.
    "higher_order_callable": (
        lambda genuine, marker: with_higher_order_call(genuine, "torch.ops.aten.from_file.default", marker),
        "aten::from_file|higher-order op 'wrap'",
    ),
    # FX writes value names into the forward it generates and execs while loading: a default argument runs.
    "value_name": (
        lambda genuine, marker: with_renamed_input(genuine, f"x=__import__('os').system('touch {marker}')"),
        "not a Python identifier",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_payload_in_the_program_runs_on_plain_torch_and_never_in_the_job(
    attack: str, genuine: Path, tmp_path: Path
) -> None:
    build, reason = ATTACKS[attack]
    proof = tmp_path / "proof"
    _plain_torch_runs(build(genuine, proof), tmp_path)
    assert proof.exists()  # the attack is real

    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(build(genuine, marker))
    with pytest.raises(InvalidModel, match=reason):
        load_program(crafted)
    with pytest.raises(InvalidModel, match=reason):
        compress(crafted, _spec(SPEC), tmp_path / "out.pt2")
    assert not marker.exists()


def test_the_genuine_program_loads_and_compresses(genuine: Path, tmp_path: Path) -> None:
    load_program(genuine).module()(torch.randn(3, 16))
    compress(genuine, _spec(SPEC), tmp_path / "out.pt2")
    assert (tmp_path / "out.pt2").stat().st_size > 0


def test_an_input_structure_naming_a_module_imports_it_on_plain_torch_and_is_refused(
    genuine: Path, tmp_path: Path
) -> None:
    # The pytree spec's context is parsed with an object hook that imports the module of any
    # {"__enum__": ...} object; ``this`` prints on import and is imported by nothing else.
    def spec(module: str) -> list:
        enum_key = json.dumps([{"__enum__": True, "fqn": f"{module}:Missing", "name": "a"}])
        leaf = {"type": None, "context": None, "children_spec": []}
        return [
            1,
            {
                "type": "builtins.tuple",
                "context": "null",
                "children_spec": [
                    {"type": "builtins.tuple", "context": "null", "children_spec": [leaf]},
                    {"type": "builtins.dict", "context": enum_key, "children_spec": []},
                ],
            },
        ]

    assert "this" not in sys.modules
    _plain_torch_runs(with_input_structure(genuine, spec("this")), tmp_path, call=False)
    assert "this" in sys.modules  # torch imported it

    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(with_input_structure(genuine, spec("antigravity")))
    with pytest.raises(InvalidModel, match="not made of plain tuples"):
        load_program(crafted)
    assert "antigravity" not in sys.modules


def test_plain_guards_pass_the_check_and_the_job_drops_them(genuine: Path, tmp_path: Path) -> None:
    # A guard the job's batch of 4 fails: plain torch asserts on it, the job's program never runs it.
    crafted = tmp_path / "guarded.pt2"
    crafted.write_bytes(with_guards_code(genuine, ["L['input'].size()[0] > 1000"]))
    with pytest.raises(AssertionError, match="Guard failed"):
        torch.export.load(crafted).module()(torch.randn(4, 16))

    assert load_program(crafted).module()(torch.randn(4, 16)).shape == (4, 4)


def _set(path: list, value) -> typing.Callable[[dict], None]:
    def change(program: dict) -> None:
        item = program
        for key in path[:-1]:
            item = item[key]
        item[path[-1]] = value

    return change


FIRST_NODE = ["graph_module", "graph", "nodes", 0]
REFUSED = {
    "an unknown top-level field": (_set(["run_this"], "x"), "field 'run_this' in ExportedProgram"),
    "an unknown node field": (_set([*FIRST_NODE, "extra"], 1), "field 'extra' in Node"),
    "an unknown argument kind": (
        _set([*FIRST_NODE, "inputs", 0, "arg"], {"as_code": "x"}),
        "Argument of kind 'as_code'",
    ),
    "an unknown schema major version": (_set(["schema_version", "major"], 9), "schema version 9"),
    "the pre-versioned schema torch skips checks for": (
        _set(["schema_version"], {"major": 0, "minor": 0}),
        "schema version 0",
    ),
    "a value of the wrong type": (_set([*FIRST_NODE, "inputs", 0, "kind"], "1"), "wrong type"),
    "an extension operator": (_set([*FIRST_NODE, "target"], "#mylib:run"), "not a torch operator"),
    "a module reached through torch": (_set([*FIRST_NODE, "target"], "torch.os.system"), "not a torch operator"),
    "an operator module function": (_set([*FIRST_NODE, "target"], "_operator.call"), "not a torch operator"),
    "a dunder of an op namespace": (_set([*FIRST_NODE, "target"], "torch.ops.aten.__class__"), "not a torch operator"),
    "a torch.ops method": (_set([*FIRST_NODE, "target"], "torch.ops.import_module.x"), "not a torch operator"),
    "a callable module argument": (
        _set([*FIRST_NODE, "inputs", 0, "arg"], {"as_operator": "torch.os"}),
        "passes the callable 'torch.os'",
    ),
    "a file-reading callable under an allowed control-flow op": (
        lambda program: (
            _set([*FIRST_NODE, "target"], "torch.ops.higher_order.cond")(program),
            _set([*FIRST_NODE, "inputs", 0, "arg"], {"as_operator": "torch.ops.aten.from_file.default"})(program),
        ),
        "passes the callable aten::from_file",
    ),
    "an unknown higher-order op": (
        _set([*FIRST_NODE, "target"], "torch.ops.higher_order.call_torchbind"),
        "higher-order op 'call_torchbind'",
    ),
    "a parameter path with quotes": (
        _set(["graph_module", "signature", "input_specs", 0, "parameter", "parameter_name"], '0")\nimport os#'),
        "not a dotted name",
    ),
    "an argument name with code": (_set([*FIRST_NODE, "inputs", 0, "name"], "a=print(1)"), "not a Python identifier"),
    "a forward argument name with code": (
        _set(["graph_module", "module_call_graph", 0, "signature", "forward_arg_names"], ["x=print(1)"]),
        "not a Python identifier",
    ),
    "a defaultdict input structure": (
        _set(
            ["graph_module", "module_call_graph", 0, "signature", "out_spec"],
            json.dumps(
                [
                    1,
                    {
                        "type": "collections.defaultdict",
                        "children_spec": [],
                        "context": json.dumps(
                            {"default_factory_module": "os", "default_factory_name": "getcwd", "dict_context": []}
                        ),
                    },
                ]
            ),
        ),
        "not made of plain tuples",
    ),
    "a dict key with a quote in the input structure": (
        _set(
            ["graph_module", "module_call_graph", 0, "signature", "out_spec"],
            json.dumps(
                [
                    1,
                    {
                        "type": "builtins.dict",
                        "children_spec": [{"type": None, "context": None, "children_spec": []}],
                        "context": json.dumps(["a':print(1),'b"]),
                    },
                ]
            ),
        ),
        "not made of plain tuples",
    ),
    "a source_fn_stack resolved through a dunder": (
        _set([*FIRST_NODE, "metadata", "source_fn_stack"], "linear,torch.__builtins__.exec"),
        "source_fn_stack",
    ),
    "a source_fn_stack extension op": (
        _set([*FIRST_NODE, "metadata", "source_fn_stack"], "linear,#mylib:run"),
        "source_fn_stack",
    ),
    "unknown node metadata": (_set([*FIRST_NODE, "metadata", "run"], "x"), "node metadata 'run'"),
    "an unknown verifier": (_set(["verifiers"], ["EXIR_CUSTOM"]), "verifier 'EXIR_CUSTOM'"),
    "a device name with code": (
        _set(["graph_module", "graph", "tensor_values", "input", "device", "type"], "cpu'); import os"),
        "device",
    ),
    "a symbol range naming code": (
        _set(["range_constraints", "__import__('os')"], {"min_val": 0, "max_val": 1}),
        "shape expression",
    ),
    "a guard calling a function": (_set(["guards_code"], ["L['input'].size()[0] == len('x')"]), "guard code"),
    "a guard reaching attributes": (_set(["guards_code"], ["L['input'].__class__ == 1"]), "guard code"),
    "a guard breaking out of its string": (_set(["guards_code"], ['L["input"].size()[0] > 1']), "guard code"),
    "a guard subscript with a dunder key": (_set(["guards_code"], ["L['__builtins__'].size()[0] == 1"]), "guard code"),
    "chained powers sympy would compute forever": (
        _set(["range_constraints", "9**9**9**9"], {"min_val": 0, "max_val": 1}),
        "shape expression",
    ),
    "a stack trace with a carriage return": (
        _set([*FIRST_NODE, "metadata", "stack_trace"], "x\rimport os"),
        "control character",
    ),
    "a model.json over its size bound": (
        _set([*FIRST_NODE, "metadata", "custom"], {"pad": "x" * (17 << 20)}),
        "larger than 16 MB",
    ),
}


def test_sample_inputs_declaring_many_entries_are_refused_before_zipfile_reads_them(
    genuine: Path, tmp_path: Path
) -> None:
    """The nested torch.save archive gets zip bounds too: zipfile would parse its whole directory."""
    import io

    def with_sample_inputs(entries: int) -> bytes:
        nested = io.BytesIO()
        with zipfile.ZipFile(nested, "w") as archive:
            archive.writestr("model/data.pkl", b"")
            for index in range(entries):
                archive.writestr(f"model/data/{index}", b"")
        out = io.BytesIO()
        with zipfile.ZipFile(genuine) as source, zipfile.ZipFile(out, "w") as archive:
            for entry in source.infolist():
                body = source.read(entry.filename)
                archive.writestr(
                    entry, nested.getvalue() if entry.filename.endswith("sample_inputs/model.pt") else body
                )
        return out.getvalue()

    problem = _problem(with_sample_inputs(5000), tmp_path)
    assert problem is not None and "declares 5001 entries" in problem, problem
    # Positive control: a few entries pass these bounds (and are then judged by the pickle check).
    assert "declares" not in (_problem(with_sample_inputs(3), tmp_path) or "")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_program_content_torch_would_turn_into_code_is_refused(case: str, genuine: Path, tmp_path: Path) -> None:
    change, reason = REFUSED[case]
    assert _problem(genuine.read_bytes(), tmp_path) is None
    problem = _problem(with_program(genuine, change), tmp_path)
    assert problem is not None and re.search(reason, problem), problem


def test_a_file_reading_callable_passes_the_form_check_when_the_policy_is_left_to_the_job(
    genuine: Path, tmp_path: Path
) -> None:
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(with_higher_order_call(genuine, "torch.ops.aten.from_file.default", tmp_path / "m"))
    names = zipfile.ZipFile(crafted).namelist()
    assert exported_program_problem(crafted, names, check_ops=False) is None  # MODELPRESS_OP_CHECK=job at submit
    assert "from_file" in exported_program_problem(crafted, names) or "wrap" in exported_program_problem(crafted, names)


class _Shapes(nn.Module):
    """A program with what torch.export writes beyond plain calls: cond, while_loop, map, no_grad, autocast,
    kwargs, a dict input and output, symbolic sizes with guards, buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, inputs: dict, *, scale: float = 1.0) -> dict:
        x = self.norm(self.linear(inputs["a"])) + inputs["b"]
        y = torch.cond(x.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (x,))
        with torch.no_grad():
            z = self.linear(y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = self.linear(z).float()
        mapped = torch._higher_order_ops.map(lambda row: row * 2, w)
        _, looped = torch._higher_order_ops.while_loop(
            lambda i, t: i < 3, lambda i, t: (i + 1, t + 1), (torch.tensor(0), mapped)
        )
        return {"out": looped.reshape(x.shape[0] // 2, -1) * scale, "size": x.shape[0] + 1}


def test_programs_of_every_shape_torch_export_writes_pass_and_load(tmp_path: Path) -> None:
    batch = torch.export.Dim("half", min=2, max=64) * 2
    inputs = ({"a": torch.randn(6, 4), "b": torch.randn(6, 4)},)
    program = torch.export.export(
        _Shapes().eval(),
        inputs,
        {"scale": 2.0},
        dynamic_shapes={"inputs": {"a": {0: batch}, "b": {0: batch}}, "scale": None},
    )
    path = tmp_path / "shapes.pt2"
    torch.export.save(program, path)
    document = json.loads(zipfile.ZipFile(path).read("shapes/models/model.json"))
    targets = {node["target"] for node in document["graph_module"]["graph"]["nodes"]}
    assert {
        "torch.ops.higher_order.cond",
        "torch.ops.higher_order.while_loop",
        "torch.ops.higher_order.map_impl",
        "torch.ops.higher_order.wrap_with_set_grad_enabled",
        "torch.ops.higher_order.wrap_with_autocast",
    } <= targets
    assert document["guards_code"]  # the reshape's divisibility

    assert exported_program_problem(path, zipfile.ZipFile(path).namelist()) is None
    out = load_program(path).module()({"a": torch.randn(8, 4), "b": torch.randn(8, 4)}, scale=2.0)
    assert out["out"].shape == (4, 8) and out["size"] == 9


# ----------------------------------------------------------------------------- the schema copy


def _render(kind) -> str:
    if typing.get_origin(kind) is typing.Annotated:
        return _render(typing.get_args(kind)[0])
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return _render(inner) + "?"
    if typing.get_origin(kind) is list:
        return f"list[{_render(typing.get_args(kind)[0])}]"
    if typing.get_origin(kind) is dict:
        key, value = typing.get_args(kind)
        assert key is str
        return f"dict[{_render(value)}]"
    return kind.__name__


def test_the_schema_copy_matches_the_schema_torch_ships() -> None:
    """The API checks model.json against a copy of torch's schema (it never imports torch); regenerate
    modelpress/pt2_schema.py from this test's ``torch_tables`` when torch is upgraded."""
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    structs, unions, enums = {}, {}, {}
    for name, item in vars(schema).items():
        if not isinstance(item, type) or item.__module__ != schema.__name__:
            continue
        if issubclass(item, enum.IntEnum):
            enums[name] = tuple(sorted(member.value for member in item))
        elif dataclasses.is_dataclass(item):
            hints = typing.get_type_hints(item, globalns=vars(schema))
            fields = {field.name: _render(hints[field.name]) for field in dataclasses.fields(item)}
            (unions if issubclass(item, _Union) else structs)[name] = fields
    used = pt2_schema.reachable("ExportedProgram") | pt2_schema.reachable("PayloadConfig")
    torch_tables = (
        {k: v for k, v in structs.items() if k in used},
        {k: v for k, v in unions.items() if k in used},
        {k: v for k, v in enums.items() if k in used},
    )

    assert schema.SCHEMA_VERSION[0] == pt2_schema.SCHEMA_MAJOR
    assert torch_tables == (pt2_schema.STRUCTS, pt2_schema.UNIONS, pt2_schema.ENUMS)
    assert used == set(pt2_schema.STRUCTS) | set(pt2_schema.UNIONS) | set(pt2_schema.ENUMS)
