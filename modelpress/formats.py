"""Model file formats: TorchScript archives and torch.export programs (``.pt2``), told apart by layout.

What ``torch.export.load`` (torch 2.14) deserialises from a ``.pt2`` archive, and so what this
module checks before any of it is loaded (read with ``zipfile`` and ``pickletools``; nothing is
unpickled and torch is not imported):

- ``<root>/models/<name>.json``: the graph as JSON, checked by ``modelpress.pt2_program`` against
  torch's export schema (unknown fields refused) and for every string torch turns into code or a
  callable: call targets and callable arguments, names FX writes into the ``forward`` it generates,
  shape expressions (sympy), guard code (exec'd by ``.module()``), pytree specs (module imports).
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
import struct
import zipfile
from pathlib import Path

from modelpress.pt2_program import Refused as _Refused, check_payload_config, check_program

TORCHSCRIPT = "torchscript"
EXPORTED = "pt2"
AOTI_PACKAGE = "aoti"  # an output only: a .pt2 program compiled by AOTInductor (spec.package "aoti")
FILE_SUFFIX = {TORCHSCRIPT: ".pt", EXPORTED: ".pt2", AOTI_PACKAGE: ".aoti.pt2"}

EXPORT_HINT = "save the program with torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"

# Globals a torch.save pickle of tensors names (protocol 2: GLOBAL 'module name').
_SAFE_GLOBALS = frozenset(
    {
        "torch._utils _rebuild_tensor_v2",
        "torch._utils _rebuild_parameter",
        "torch._tensor _rebuild_from_type_v2",
        "torch Tensor",
        "collections OrderedDict",
        "torch device",
        "torch Size",
        *(
            f"torch {kind}Storage"
            for kind in (
                "Float",
                "Double",
                "Half",
                "BFloat16",
                "Long",
                "Int",
                "Short",
                "Char",
                "Byte",
                "Bool",
                "ComplexFloat",
                "ComplexDouble",
            )
        ),
        *(
            f"torch {dtype}"
            for dtype in (
                "float32",
                "float64",
                "float16",
                "bfloat16",
                "int64",
                "int32",
                "int16",
                "int8",
                "uint8",
                "bool",
            )
        ),
    }
)
# Opcodes that import a name without it appearing as a GLOBAL argument (STACK_GLOBAL takes its
# strings from the stack, perhaps from the memo; EXT* from the copyreg registry). torch.save writes
# protocol 2, which uses GLOBAL only, so refusing these refuses no genuine file.
_IMPORTING_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})
# json.loads holds about 28x a file's size (a 24 MB model.json took the API 670 MB): a program's
# graph is a few MB even for a large transformer (resnet50: 0.44 MB), weights are elsewhere.
_MAX_JSON_BYTES = 16 << 20
_MAX_SAMPLE_INPUT_BYTES = 64 << 20


def is_exported_program(names: list[str]) -> bool:
    """True for the layout torch.export.save writes: one root folder with archive_format and models/*.json."""
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        return False
    root = next(iter(roots))
    return f"{root}/archive_format" in names and any(
        name.startswith(f"{root}/models/") and name.endswith(".json") for name in names
    )


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
    inner = {name[len(root) + 1 :] for name in names}
    if archive.read(f"{root}/archive_format")[:16].strip() != b"pt2":
        raise _Refused(f"the .pt2 archive's archive_format is not 'pt2'; {EXPORT_HINT}")
    models = sorted(
        name[len("models/") : -len(".json")] for name in inner if name.startswith("models/") and name.endswith(".json")
    )
    if models != ["model"]:
        raise _Refused(f"the .pt2 archive must hold exactly one program named 'model' (found {models}); {EXPORT_HINT}")
    for name in sorted(inner):
        _check_entry(name)
    for config_name, folder in (
        ("data/weights/model_weights_config.json", "weights"),
        ("data/constants/model_constants_config.json", "constants"),
    ):
        if config_name not in inner:
            raise _Refused(
                f"the .pt2 archive has no {config_name}: not the layout torch.export.save writes "
                f"in torch 2.6 or later; {EXPORT_HINT}"
            )
        check_payload_config(_read_json(archive, f"{root}/{config_name}"), folder)
    check_program(_read_json(archive, f"{root}/models/model.json"), check_ops)
    sample = f"{root}/data/sample_inputs/model.pt"
    if sample in names:
        _check_torch_save(archive, sample)


def _check_entry(name: str) -> None:
    if name.endswith("/") or _ALLOWED_ENTRIES.match(name):
        return
    if "custom_obj" in name or "opaque_obj" in name:
        raise _Refused(
            f"the .pt2 archive holds a pickled object ({name[:100]!r}) that torch.export.load would unpickle, "
            "running code from the file: refused"
        )
    raise _Refused(f"the .pt2 archive holds an entry torch.export.save does not write ({name[:100]!r}): refused")


def _read_json(archive: zipfile.ZipFile, name: str) -> object:
    if archive.getinfo(name).file_size > _MAX_JSON_BYTES:
        raise _Refused(f"{name.split('/', 1)[-1]} is larger than {_MAX_JSON_BYTES >> 20} MB")
    try:
        return json.loads(archive.read(name))
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than the parser's stack
        raise _Refused(f"{name.split('/', 1)[-1]} is not valid JSON ({error})") from None


def _check_torch_save(archive: zipfile.ZipFile, name: str) -> None:
    """A nested torch.save archive may only pickle tensors (the allow-list); checked without unpickling."""
    if archive.getinfo(name).file_size > _MAX_SAMPLE_INPUT_BYTES:
        raise _Refused(f"the .pt2 sample inputs are larger than {_MAX_SAMPLE_INPUT_BYTES >> 20} MB: refused")
    payload = archive.read(name)
    if not payload:  # what torch.export.save writes for a program without example inputs
        return
    if not zipfile.is_zipfile(io.BytesIO(payload)):
        raise _Refused("the .pt2 sample inputs are a bare pickle, not a torch.save archive: refused unread")
    _bound_nested_directory(payload)
    with zipfile.ZipFile(io.BytesIO(payload)) as nested:
        pickles = [entry for entry in nested.namelist() if entry.endswith(".pkl")]
        if len(pickles) != 1 or not pickles[0].endswith("/data.pkl") or len(nested.namelist()) > 10_000:
            raise _Refused("the .pt2 sample inputs archive does not have the layout torch.save writes: refused")
        if nested.getinfo(pickles[0]).file_size > _MAX_SAMPLE_INPUT_BYTES:
            raise _Refused("the .pt2 sample inputs pickle is too large: refused")
        _check_pickle(nested.read(pickles[0]))


_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_MAX_NESTED_ENTRIES = 64  # torch.save of a few example tensors writes fewer than ten
_MAX_NESTED_DIRECTORY = 64 << 10


def _bound_nested_directory(payload: bytes) -> None:
    """Before ``zipfile`` parses the nested archive's directory (all of it, whatever it declares),
    bound what its end records declare: a directory of a million empty entries costs the API
    hundreds of MB to parse."""
    end = payload.rfind(b"PK\x05\x06", max(0, len(payload) - (1 << 16) - _END.size))
    if end < 0 or len(payload) < end + _END.size:
        raise _Refused("the .pt2 sample inputs archive has no readable zip directory: refused")
    fields = _END.unpack_from(payload, end)
    entries, directory = fields[4], fields[5]
    locator = end - _END64_LOCATOR.size
    if locator >= 0 and payload[locator : locator + 4] == b"PK\x06\x07":  # zip64: zipfile takes these values
        record = locator - _END64.size
        if record < 0 or payload[record : record + 4] != b"PK\x06\x06":
            raise _Refused("the .pt2 sample inputs archive is damaged (zip64 end record): refused")
        zip64 = _END64.unpack_from(payload, record)
        entries, directory = max(entries, zip64[6], zip64[7]), max(directory, zip64[8])
    if entries > _MAX_NESTED_ENTRIES or directory > _MAX_NESTED_DIRECTORY:
        raise _Refused(
            f"the .pt2 sample inputs archive declares {entries} entries in {directory} bytes of directory "
            f"(torch.save of example inputs writes a few): refused"
        )


def _check_pickle(data: bytes) -> None:
    """Every global the pickle imports must be on the allow-list: the only way a pickle reaches code."""
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in _IMPORTING_OPCODES:
                raise _Refused(
                    f"the .pt2 sample inputs pickle uses {opcode.name}, which torch.save never writes: refused unread"
                )
            if opcode.name == "GLOBAL":
                name = str(argument).replace("\n", " ")
                if name not in _SAFE_GLOBALS:
                    raise _Refused(
                        f"the .pt2 sample inputs pickle names {name[:100]!r}, which could run code "
                        "when torch.export.load unpickles it: refused unread"
                    )
    except ValueError as error:
        raise _Refused(f"the .pt2 sample inputs pickle is malformed ({str(error)[:200]}): refused") from None
