"""Model file formats: TorchScript archives and torch.export programs (``.pt2``), told apart by layout.

What ``torch.export.load`` (torch 2.14) deserialises from a ``.pt2`` archive, and so what this
module checks before any of it is loaded (read with ``zipfile`` and ``pickletools``; nothing is
unpickled and torch is not imported):

- ``<root>/models/<name>.json``: the graph as JSON. Call targets are resolved by attribute lookup
  from the ``torch``, ``_operator`` and ``math`` modules (``torch.os.system`` would resolve), so
  every target must be an operator of an allowed ``torch.ops`` namespace or a plain ``_operator``
  / ``math`` function; ``aten.from_file`` (reads any file) is refused.
- Symbolic shapes (``expr_str``, e.g. ``Symbol('s77', positive=True, integer=True)``) are parsed
  with ``sympy.sympify``, which evaluates Python: each must be made of symbol names, sympy
  function names, numbers and arithmetic only.
- ``data/weights/*`` and ``data/constants/*``: raw tensor bytes described by a JSON config, unless
  the config marks an entry ``use_pickle`` (tensor subclasses), which torch loads with
  ``torch.load(weights_only=False)``: arbitrary code. Refused.
- ``data/constants/custom_obj_*`` (TorchScript ``_pickle_load_obj``) and ``opaque_obj_*``
  (``pickle.loads``): arbitrary code. Refused.
- ``data/sample_inputs/<name>.pt``: a ``torch.save`` archive that torch loads with
  ``weights_only=True`` and, if that fails, again with ``weights_only=False``. Its pickle may only
  name tensor-rebuilding globals (allow-list below).
- Legacy single-file weights (``data/weights/<name>.pt``), AOTInductor shared libraries and any
  other entry are refused: only the layout ``torch.export.save`` writes is accepted.
"""
from __future__ import annotations

import io
import json
import pickletools
import re
import tokenize
import zipfile
from pathlib import Path

from workers.compression.program_check import refusal

TORCHSCRIPT = "torchscript"
EXPORTED = "pt2"
AOTI_PACKAGE = "aoti"  # an output only: a .pt2 program compiled by AOTInductor (spec.package "aoti")
FILE_SUFFIX = {TORCHSCRIPT: ".pt", EXPORTED: ".pt2", AOTI_PACKAGE: ".aoti.pt2"}

EXPORT_HINT = "save the program with torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"

# Globals a torch.save pickle of tensors names (protocol 2: GLOBAL 'module name').
_SAFE_GLOBALS = frozenset({
    "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter", "torch._tensor _rebuild_from_type_v2",
    "torch Tensor", "collections OrderedDict", "torch device", "torch Size",
    *(f"torch {kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short",
                                           "Char", "Byte", "Bool", "ComplexFloat", "ComplexDouble")),
    *(f"torch {dtype}" for dtype in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                                     "int8", "uint8", "bool")),
})
# Opcodes that import a name without it appearing as a GLOBAL argument (STACK_GLOBAL takes its
# strings from the stack, perhaps from the memo; EXT* from the copyreg registry). torch.save writes
# protocol 2, which uses GLOBAL only, so refusing these refuses no genuine file.
_IMPORTING_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})
_OPS_HINT = "models that read or write files, start processes or talk to other processes are refused"
_TARGET = re.compile(r"^(?:torch\.ops\.(?P<namespace>\w+)\.(?P<op>\w+)(?:\.\w+)?|_operator\.\w+|math\.\w+)$")
# What sympy.sympify may be given: a symbol name (s0, u3), a sympy class or function (CamelCase:
# Symbol, FloorDiv, Max, ...), a symbol assumption keyword, numbers and arithmetic. No attribute
# access, subscripts, lambdas or lower-case callables (eval, __import__, lambdify).
_SYMBOL_NAME = re.compile(r"^[a-z]{1,8}\d{1,9}$")
_SYMPY_NAME = re.compile(r"^[A-Z][A-Za-z0-9]{0,40}$")
_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                          "nonzero", "zero", "even", "odd", "commutative", "oo", "zoo", "nan", "evaluate"})
_EXPRESSION_OPERATORS = frozenset({"(", ")", ",", "+", "-", "*", "/", "//", "%", "**", "=", "<", ">", "<=", ">=",
                                   "==", "!=", "&", "|", "~"})
_MAX_JSON_BYTES = 256 << 20
_MAX_SAMPLE_INPUT_BYTES = 64 << 20


def is_exported_program(names: list[str]) -> bool:
    """True for the layout torch.export.save writes: one root folder with archive_format and models/*.json."""
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        return False
    root = next(iter(roots))
    return f"{root}/archive_format" in names and any(
        name.startswith(f"{root}/models/") and name.endswith(".json") for name in names)


def model_format(path: Path) -> str:
    """``pt2`` for a torch.export archive, else ``torchscript`` (what the archive check accepted)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return EXPORTED if is_exported_program(archive.namelist()) else TORCHSCRIPT
    except (zipfile.BadZipFile, OSError):
        return TORCHSCRIPT


def exported_program_problem(path: Path, names: list[str], check_ops: bool = True) -> str | None:
    """Why the .pt2 archive at ``path`` (entry ``names``, already bounded) is refused, or None if it is safe to load.

    ``check_ops`` False (``MODELPRESS_OP_CHECK`` other than ``on``) leaves the operator policy to the
    job; the layout, pickle and shape-expression checks always run: they guard the load itself.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            _check_exported_program(archive, names, check_ops)
    except _Refused as refused:
        return str(refused)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
        return f"the .pt2 archive is damaged ({str(error)[:200]}); upload the complete file again"
    return None


# ---------------------------------------------------------------------------- helpers

_ALLOWED_ENTRIES = re.compile(
    r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json|"
    r"data/weights/(weight_\d+|model_weights_config\.json)|"
    r"data/constants/(tensor_\d+|model_constants_config\.json)|"
    r"data/sample_inputs/model\.pt|extra/[\w.\-]+)$"
)


def _check_exported_program(archive: zipfile.ZipFile, names: list[str], check_ops: bool) -> None:
    if len(set(names)) != len(names):  # which copy torch's reader takes need not be the one checked here
        raise _Refused("the .pt2 archive holds two entries with the same name: refused")
    root = names[0].split("/", 1)[0]
    inner = {name[len(root) + 1:] for name in names}
    if archive.read(f"{root}/archive_format")[:16].strip() != b"pt2":
        raise _Refused(f"the .pt2 archive's archive_format is not 'pt2'; {EXPORT_HINT}")
    models = sorted(name[len("models/"):-len(".json")] for name in inner
                    if name.startswith("models/") and name.endswith(".json"))
    if models != ["model"]:
        raise _Refused(f"the .pt2 archive must hold exactly one program named 'model' (found {models}); {EXPORT_HINT}")
    for name in sorted(inner):
        _check_entry(name)
    for config_name, folder in (("data/weights/model_weights_config.json", "weights"),
                                ("data/constants/model_constants_config.json", "constants")):
        if config_name not in inner:
            raise _Refused(f"the .pt2 archive has no {config_name}: not the layout torch.export.save writes "
                           f"in torch 2.6 or later; {EXPORT_HINT}")
        _check_payload_config(_read_json(archive, f"{root}/{config_name}"), folder)
    program = _read_json(archive, f"{root}/models/model.json")
    _check_graph(program, check_ops)
    for expression in _values(program, "expr_str"):
        _check_expression(expression)
    sample = f"{root}/data/sample_inputs/model.pt"
    if sample in names:
        _check_torch_save(archive, sample)


def _check_entry(name: str) -> None:
    if name.endswith("/") or _ALLOWED_ENTRIES.match(name):
        return
    if "custom_obj" in name or "opaque_obj" in name:
        raise _Refused(f"the .pt2 archive holds a pickled object ({name[:100]!r}) that torch.export.load would unpickle, "
                "running code from the file: refused")
    raise _Refused(f"the .pt2 archive holds an entry torch.export.save does not write ({name[:100]!r}): refused")


def _read_json(archive: zipfile.ZipFile, name: str) -> object:
    if archive.getinfo(name).file_size > _MAX_JSON_BYTES:
        raise _Refused(f"{name.split('/', 1)[-1]} is larger than {_MAX_JSON_BYTES >> 20} MB")
    try:
        return json.loads(archive.read(name))
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than the parser's stack
        raise _Refused(f"{name.split('/', 1)[-1]} is not valid JSON ({error})") from None


def _check_payload_config(config: object, folder: str) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _Refused(f"the .pt2 {folder} config is malformed")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _Refused(f"the .pt2 {folder} entry {str(fqn)[:100]!r} is stored as a pickle, which torch.export.load "
                    "unpickles with weights_only=False (code from the file would run): refused; save plain tensors")
        if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name", ""))):
            raise _Refused(f"the .pt2 {folder} entry {str(fqn)[:100]!r} is not a plain tensor: refused")


def _check_graph(program: object, check_ops: bool) -> None:
    """Targets resolve by attribute lookup on ``torch`` when loaded, so their form is always checked;
    which operators may run is the TorchScript path's policy (``program_check.refusal``)."""
    for target in _values(program, "target"):
        match = _TARGET.match(target)
        if match is None:
            raise _Refused(f"the program calls {target[:100]!r}, which is not a torch operator: refused")
        namespace = match.group("namespace")
        if check_ops and namespace is not None and namespace != "higher_order":  # cond, map, while_loop
            why = refusal(f"{namespace}::{match.group('op')}")
            if why:
                raise _Refused(f"the program calls {namespace}::{match.group('op')}: it {why}; {_OPS_HINT}")


def _check_expression(expression: str) -> None:
    """A symbolic-shape expression sympy may parse (it evaluates it as Python)."""
    refused = _Refused(f"the program holds a shape expression {expression[:100]!r} that is not plain arithmetic "
                       "on symbols (torch.export.load would evaluate it as Python): refused")
    if len(expression) > 10_000 or "__" in expression:
        raise refused
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expression).readline))
    except (tokenize.TokenError, SyntaxError):
        raise refused from None
    for token in tokens:
        if token.type == tokenize.NAME:
            ok = bool(_SYMBOL_NAME.match(token.string) or _SYMPY_NAME.match(token.string)) \
                or token.string in _ASSUMPTIONS
        elif token.type == tokenize.OP:
            ok = token.string in _EXPRESSION_OPERATORS
        elif token.type == tokenize.STRING:
            ok = token.string[:1] in "'\"" and bool(_SYMBOL_NAME.match(token.string[1:-1]))
        else:
            ok = token.type in (tokenize.NUMBER, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
        if not ok:
            raise refused


def _values(node: object, field: str):
    """Every string under the key ``field`` in the serialized program, nested graphs included."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == field and isinstance(value, str):
                    yield value
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(value for value in item if isinstance(value, (dict, list)))


def _check_torch_save(archive: zipfile.ZipFile, name: str) -> None:
    """A nested torch.save archive may only pickle tensors (the allow-list); checked without unpickling."""
    if archive.getinfo(name).file_size > _MAX_SAMPLE_INPUT_BYTES:
        raise _Refused(f"the .pt2 sample inputs are larger than {_MAX_SAMPLE_INPUT_BYTES >> 20} MB: refused")
    payload = archive.read(name)
    if not payload:  # what torch.export.save writes for a program without example inputs
        return
    if not zipfile.is_zipfile(io.BytesIO(payload)):
        raise _Refused("the .pt2 sample inputs are a bare pickle, not a torch.save archive: refused unread")
    with zipfile.ZipFile(io.BytesIO(payload)) as nested:
        pickles = [entry for entry in nested.namelist() if entry.endswith(".pkl")]
        if len(pickles) != 1 or not pickles[0].endswith("/data.pkl") or len(nested.namelist()) > 10_000:
            raise _Refused("the .pt2 sample inputs archive does not have the layout torch.save writes: refused")
        if nested.getinfo(pickles[0]).file_size > _MAX_SAMPLE_INPUT_BYTES:
            raise _Refused("the .pt2 sample inputs pickle is too large: refused")
        _check_pickle(nested.read(pickles[0]))


def _check_pickle(data: bytes) -> None:
    """Every global the pickle imports must be on the allow-list: the only way a pickle reaches code."""
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in _IMPORTING_OPCODES:
                raise _Refused(f"the .pt2 sample inputs pickle uses {opcode.name}, which torch.save never writes: "
                               "refused unread")
            if opcode.name == "GLOBAL":
                name = str(argument).replace("\n", " ")
                if name not in _SAFE_GLOBALS:
                    raise _Refused(f"the .pt2 sample inputs pickle names {name[:100]!r}, which could run code "
                                   "when torch.export.load unpickles it: refused unread")
    except ValueError as error:
        raise _Refused(f"the .pt2 sample inputs pickle is malformed ({str(error)[:200]}): refused") from None


class _Refused(Exception):
    """Internal: carries the reason out of the nested checks to ``exported_program_problem``."""
