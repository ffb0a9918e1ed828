"""What a ``.pt2`` program's ``models/model.json`` may hold: nothing that torch turns into code.

Read from torch 2.14's deserializer (``torch/_export/serde/serialize.py``), ``.module()``
(``torch/export/_unlift.py``) and FX code generation (``torch/fx/graph.py``), the places where a
string of the file becomes code or a callable, and what this module demands of each:

- Every key must be a field of its schema type (``pt2_schema``); values have the schema's types.
- ``Node.target`` and ``Argument.as_operator`` are resolved by ``getattr`` chains from ``torch``,
  ``_operator`` and ``math`` (``torch.os`` would resolve to the ``os`` module; ``#ns:op`` goes to
  an extension registry). Both must be a ``torch.ops.<namespace>.<op>[.<overload>]`` of an allowed
  namespace (the TorchScript policy, ``operator_policy.refusal``), a higher-order op of an explicit
  allow-list (pure control flow and subgraph wrappers), or one of the symbolic-size functions
  torch's serializer writes (``_operator.add``, ``torch.sym_max``, ...). Subgraphs (``as_graph``)
  are walked like the main graph.
- Node names, argument names, placeholder names and signature names become Python identifiers in
  the ``forward`` that FX generates and ``exec``\\ s while loading (``x=__import__('os')...`` as an
  input name runs at load). They must be identifiers; attribute paths dotted ``\\w`` names.
- Symbolic shapes (``expr_str``) are parsed with ``sympy.sympify``, which evaluates Python:
  arithmetic on symbols only.
- ``guards_code``: strings that ``.module()`` pastes into a function and ``exec``\\ s. Each must be
  a plain guard (comparisons of input sizes); the job drops them all the same.
- ``in_spec`` / ``out_spec`` (pytree specs): their ``context`` is parsed with an object hook that
  imports any module named in an ``__enum__`` object, and ``collections.defaultdict`` imports its
  factory's module. Only builtin containers with plain contexts are accepted.
- ``source_fn_stack`` metadata is resolved by ``getattr`` chains from ``torch``: a dotted name, no
  dunder parts, no extension ops. Other metadata keys must be the ones torch writes.
- ``verifiers`` name a registry entry, ``range_constraints`` keys are symbol expressions, ``Device.type``
  a device: each is checked against its form.

The strings torch evaluates (shape expressions, guards, pytree specs) are checked in
``modelpress.pt2_evaluated_strings``, which also defines ``Refused``.
"""

from __future__ import annotations

import re

from modelpress.operator_policy import HINT, refusal
from modelpress.pt2_evaluated_strings import (
    ATTRIBUTE_PATH,
    Refused,
    check_expression,
    check_guard,
    check_treespec,
)
from modelpress.pt2_schema import ENUMS, FLOAT_WORDS, SCHEMA_MAJOR, STRUCTS, UNIONS

# Higher-order ops that only run subgraphs of the same program (control flow, grad / autocast
# modes). Others call operators or objects named by argument (auto_functionalized, with_effects,
# out_dtype, call_torchbind), run kernels or code from elsewhere (triton, inductor, executorch,
# aoti, inline_asm) or print (print): refused.
HIGHER_ORDER_OPS = frozenset(
    {"cond", "while_loop", "map_impl", "scan", "associative_scan", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
)
# Non-operator call targets torch's serializer writes (serialize.py ``_SYM_OPS``): size arithmetic.
SYMBOLIC_TARGETS = frozenset(
    {
        *(
            f"_operator.{name}"
            for name in (
                "eq",
                "ne",
                "le",
                "ge",
                "lt",
                "gt",
                "neg",
                "pos",
                "mul",
                "add",
                "sub",
                "floordiv",
                "mod",
                "pow",
                "truediv",
                "and_",
                "or_",
                "lshift",
                "rshift",
            )
        ),
        "math.trunc",
        *(f"torch.{name}" for name in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")),
    }
)
_OPERATOR = re.compile(
    r"^torch\.ops\.(?P<namespace>[A-Za-z_]\w{0,99})\.(?P<op>[A-Za-z_]\w{0,199})"
    r"(?:\.(?P<overload>[A-Za-z]\w{0,99}))?$",
    re.ASCII,
)
# aten's own dunder operators (``aten::__and__``); any other dunder reaches Python object internals.
_DUNDER_OPS = frozenset(
    f"__{name}__" for name in ("and", "or", "xor", "lshift", "rshift", "iand", "ior", "ixor", "ilshift", "irshift")
)
# Attributes of torch.ops itself: a "namespace" of these names resolves to a method or a set.
_OPS_ATTRIBUTES = frozenset({"load_library", "import_module", "loaded_libraries", "_dir"})
_IDENTIFIER = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]{0,199})?$")  # empty: an unnamed positional argument
_DEVICE = re.compile(r"^[a-z_]{1,32}$")
_VERIFIERS = frozenset({"", "ATEN", "TRAINING"})
_NODE_METADATA = frozenset({"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node"})
_GRAPH_METADATA = frozenset({"custom"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")
_META_TARGET = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$", re.ASCII)

# String fields by role: (type, field) -> what the string must be. Dict keys: (type, field, "key").
_NAME_FIELDS = {
    ("TensorArgument", "name"),
    ("TokenArgument", "name"),
    ("SymIntArgument", "as_name"),
    ("SymFloatArgument", "as_name"),
    ("SymBoolArgument", "as_name"),
    ("GraphArgument", "name"),
    ("CustomObjArgument", "name"),
    ("NamedArgument", "name"),
    ("Node", "name"),
    ("InputToConstantInputSpec", "name"),
    ("GradientToUserInputSpec", "user_input_name"),
    ("UserInputMutationSpec", "user_input_name"),
    ("ModuleCallSignature", "forward_arg_names"),
    ("NamedTupleDef", "field_names"),
    *(
        ("Graph", field, "key")
        for field in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values")
    ),
}
_PATH_FIELDS = {
    ("InputToParameterSpec", "parameter_name"),
    ("InputToBufferSpec", "buffer_name"),
    ("InputToTensorConstantSpec", "tensor_constant_name"),
    ("InputToCustomObjSpec", "custom_obj_name"),
    ("BufferMutationSpec", "buffer_name"),
    ("ParameterMutationSpec", "parameter_name"),
    ("GradientToParameterSpec", "parameter_name"),
    ("ModuleCallEntry", "fqn"),
    ("CustomObjArgument", "class_fqn"),
    ("GraphModule", "treespec_namedtuple_fields", "key"),
    ("PayloadConfig", "config", "key"),
    ("ExportedProgram", "opset_version", "key"),
}


def check_program(program: object, check_ops: bool) -> None:
    """Raise ``Refused`` unless ``program`` (parsed model.json) holds only what loads without running its strings.

    ``check_ops`` False leaves which operators may run to the job; the form of every call target is
    checked regardless (it decides what ``getattr`` resolves)."""
    if not isinstance(program, dict) or not isinstance(program.get("schema_version"), dict):
        raise Refused("models/model.json is not a torch.export program (no schema_version)")
    major = program["schema_version"].get("major")
    if major != SCHEMA_MAJOR:
        raise Refused(
            f"models/model.json has serialization schema version {str(major)[:20]}, not {SCHEMA_MAJOR}: "
            "save the program with torch 2.5 or later (this service runs torch 2.14)"
        )
    walk(program, "ExportedProgram", check_ops)


def check_payload_config(config: object, folder: str) -> None:
    """A weights or constants config: schema fields only, every entry a plain tensor file."""
    walk(config, "PayloadConfig", check_ops=False)
    for fqn, meta in config["config"].items():
        if meta.get("use_pickle") is not False:
            raise Refused(
                f"the .pt2 {folder} entry {fqn[:100]!r} is stored as a pickle, which torch.export.load "
                "unpickles with weights_only=False (code from the file would run): refused; "
                "save plain tensors"
            )
        if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name", ""))):
            raise Refused(f"the .pt2 {folder} entry {fqn[:100]!r} is not a plain tensor: refused")


def walk(document: object, root: str, check_ops: bool) -> None:
    """Check ``document`` against schema type ``root`` and every string against its role; iterative."""
    stack: list[tuple[object, str, tuple]] = [(document, root, ())]
    while stack:
        value, kind, role = stack.pop()
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if kind.startswith("list["):
            if not isinstance(value, list):
                raise _wrong_type(role, kind)
            item = kind[5:-1]
            stack.extend((entry, item, role) for entry in value)
        elif kind.startswith("dict["):
            if not isinstance(value, dict):
                raise _wrong_type(role, kind)
            item = kind[5:-1]
            for key, entry in value.items():
                _check_string(key, (*role, "key") if len(role) == 2 else (), check_ops)
                stack.append((entry, item, role))
        elif kind in STRUCTS:
            fields = STRUCTS[kind]
            if not isinstance(value, dict):
                raise _wrong_type(role, kind)
            unknown = [key for key in value if key not in fields]
            if unknown:
                raise Refused(
                    f"models/model.json holds a field {unknown[0][:100]!r} in {kind} that torch's export "
                    f"schema (version {SCHEMA_MAJOR}) does not define: refused"
                )
            _check_struct(kind, value, check_ops)
            stack.extend((entry, fields[key], (kind, key)) for key, entry in value.items())
        elif kind in UNIONS:
            variants = UNIONS[kind]
            if not isinstance(value, dict) or len(value) != 1:
                raise _wrong_type(role, kind)
            ((key, entry),) = value.items()
            if key not in variants:
                raise Refused(
                    f"models/model.json holds a {kind} of kind {key[:100]!r} that torch's export schema "
                    f"(version {SCHEMA_MAJOR}) does not define: refused"
                )
            stack.append((entry, variants[key], (kind, key)))
        elif kind in ENUMS:
            if type(value) is not int or value not in ENUMS[kind]:
                raise _wrong_type(role, kind)
        elif kind == "str":
            if not isinstance(value, str):
                raise _wrong_type(role, kind)
            _check_string(value, role, check_ops)
        elif kind == "int":
            if type(value) is not int:
                raise _wrong_type(role, kind)
        elif kind == "float":
            if not (type(value) in (int, float) or value in FLOAT_WORDS):
                raise _wrong_type(role, kind)
        elif kind == "bool":
            if type(value) is not bool:
                raise _wrong_type(role, kind)
        else:  # a type name missing from the tables: the tables are wrong, refuse rather than pass
            raise Refused(f"models/model.json uses schema type {kind!r}, which this service does not know: refused")


def _wrong_type(role: tuple, kind: str) -> Refused:
    where = ".".join(role[:2]) if role else "the document"
    return Refused(f"models/model.json holds a value of the wrong type at {where} (the schema says {kind}): refused")


def _check_struct(kind: str, value: dict, check_ops: bool) -> None:
    """Checks that need the whole object: node metadata (a free-form map in the schema)."""
    if kind == "Node" and isinstance(value.get("metadata"), dict):
        _check_node_metadata(value["metadata"])
    elif kind == "GraphModule" and isinstance(value.get("metadata"), dict):
        extra = sorted(set(value["metadata"]) - _GRAPH_METADATA)
        if extra:
            raise Refused(
                f"models/model.json holds graph metadata {extra[0][:100]!r}, which torch.export.save "
                "never writes: refused"
            )


def _check_string(text: str, role: tuple, check_ops: bool) -> None:
    if role in _NAME_FIELDS:
        if not _IDENTIFIER.match(text):
            raise Refused(
                f"the program names a value {text[:100]!r}, which is not a Python identifier (torch "
                "writes it into the code it generates and runs while loading): refused"
            )
    elif role in _PATH_FIELDS:
        if not ATTRIBUTE_PATH.match(text):
            raise Refused(f"the program names an attribute {text[:100]!r}, which is not a dotted name: refused")
    elif role in (("Node", "target"), ("Argument", "as_operator")):
        check_operator(text, check_ops, role[1] == "as_operator")
    elif role == ("SymExpr", "expr_str"):
        check_expression(text)
    elif role == ("ExportedProgram", "guards_code"):
        check_guard(text)
    elif role in (("ModuleCallSignature", "in_spec"), ("ModuleCallSignature", "out_spec")):
        check_treespec(text)
    elif role == ("ExportedProgram", "range_constraints", "key"):  # a symbol or a derived one ("2*s65")
        check_expression(text)
    elif role == ("Device", "type"):
        if not _DEVICE.match(text):
            raise Refused(f"the program names a device {text[:100]!r}: refused")
    elif role == ("ExportedProgram", "verifiers"):  # noqa: SIM102  one branch per role, each with its check
        if text not in _VERIFIERS:
            raise Refused(f"the program names a verifier {text[:100]!r} that torch.export does not write: refused")


# ------------------------------------------------------------------ call targets


def check_operator(target: str, check_ops: bool, argument: bool = False) -> None:
    """A call target or callable argument: an allowed operator, an allowed higher-order op, or size arithmetic."""
    what = "passes the callable" if argument else "calls"
    if target in SYMBOLIC_TARGETS:
        return
    match = _OPERATOR.match(target)
    if (
        match is None
        or match.group("namespace").startswith("__")
        or match.group("namespace") in _OPS_ATTRIBUTES
        or (match.group("op").startswith("__") and match.group("op") not in _DUNDER_OPS)
    ):
        raise Refused(f"the program {what} {target[:100]!r}, which is not a torch operator: refused")
    namespace, op = match.group("namespace"), match.group("op")
    if not check_ops:
        return
    if namespace == "higher_order":
        if op not in HIGHER_ORDER_OPS:
            raise Refused(
                f"the program {what} the higher-order op {op!r}: only control flow and subgraph wrappers "
                f"({', '.join(sorted(HIGHER_ORDER_OPS))}) may run: refused"
            )
        return
    why = refusal(f"{namespace}::{op}")
    if why:
        raise Refused(f"the program {what} {namespace}::{op}: it {why}; {HINT}")


# ------------------------------------------------------------------ node metadata


def _check_node_metadata(metadata: dict) -> None:
    # A carriage return survives torch's split of a stack trace into lines, and FX pastes those
    # lines into the code it prints: no control character besides newline and tab, in any of them.
    for key, text in metadata.items():
        if isinstance(text, str) and _CONTROL.search(text):
            raise Refused(f"models/model.json holds node metadata {str(key)[:100]!r} with a control character: refused")
    extra = sorted(set(metadata) - _NODE_METADATA)
    if extra:
        raise Refused(
            f"models/model.json holds node metadata {str(extra[0])[:100]!r}, which torch.export.save never "
            "writes: refused"
        )
    stack = metadata.get("source_fn_stack")
    if isinstance(stack, str):  # "name,target;name,target": targets resolved by getattr from torch
        for item in stack.split(";"):
            target = item.rpartition(",")[2]
            resolved = target.startswith(("torch", "_operator", "math", "#"))
            if resolved and (not _META_TARGET.match(target) or "__" in target):
                raise Refused(
                    f"the program's source_fn_stack names {target[:100]!r}, which torch would resolve "
                    "by attribute lookup and is not a plain dotted name: refused"
                )
