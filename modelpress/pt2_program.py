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
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize

from modelpress.operator_policy import HINT, refusal
from modelpress.pt2_schema import ENUMS, FLOAT_WORDS, SCHEMA_MAJOR, STRUCTS, UNIONS


class Refused(Exception):
    """Why the program is refused: a sentence for the user."""


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
_ATTRIBUTE_PATH = re.compile(r"^(?:\w{1,200}(?:\.\w{1,200}){0,50})?$", re.ASCII)
_SYMBOL_NAME = re.compile(r"^[a-z]{1,8}\d{1,9}$")
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
        if not _ATTRIBUTE_PATH.match(text):
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


# ------------------------------------------------------------------ shape expressions

# What sympy.sympify may be given: a symbol name (s0, u3), a sympy class or function (CamelCase:
# Symbol, FloorDiv, Max, ...), a symbol assumption keyword, numbers and arithmetic. No attribute
# access, subscripts, lambdas or lower-case callables (eval, __import__, lambdify).
_SYMPY_NAME = re.compile(r"^[A-Z][A-Za-z0-9]{0,40}$")
_ASSUMPTIONS = frozenset(
    {
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "nonzero",
        "zero",
        "even",
        "odd",
        "commutative",
        "oo",
        "zoo",
        "nan",
        "evaluate",
    }
)
MAX_EXPONENT = 64
MAX_POWERS = 3
_EXPRESSION_OPERATORS = frozenset(
    {"(", ")", ",", "+", "-", "*", "/", "//", "%", "**", "=", "<", ">", "<=", ">=", "==", "!=", "&", "|", "~"}
)


def check_expression(expression: str) -> None:
    """A symbolic-shape expression sympy may parse (it evaluates it as Python)."""
    refused = Refused(
        f"the program holds a shape expression {expression[:100]!r} that is not plain arithmetic "
        "on symbols (torch.export.load would evaluate it as Python): refused"
    )
    if len(expression) > 10_000 or "__" in expression:
        raise refused
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expression).readline))
    except (tokenize.TokenError, SyntaxError):
        raise refused from None
    if expression.count("**") > MAX_POWERS:
        raise refused
    for token, after, then in zip(tokens, [*tokens[1:], None], [*tokens[2:], None, None]):
        if token.type == tokenize.NAME:
            ok = (
                bool(_SYMBOL_NAME.match(token.string) or _SYMPY_NAME.match(token.string))
                or token.string in _ASSUMPTIONS
            )
        elif token.type == tokenize.OP and token.string == "**":
            # sympy computes integer powers when it parses: 9**9**9**9 would never finish. A power
            # has a small literal exponent (s0**2), is never chained, and an expression holds a few
            # (nested in parentheses, 3 powers of at most 64 reach 9**262144: computed at once).
            ok = (
                after is not None
                and after.type == tokenize.NUMBER
                and after.string.isdigit()
                and int(after.string) <= MAX_EXPONENT
                and (then is None or then.string != "**")
            )
        elif token.type == tokenize.OP:
            ok = token.string in _EXPRESSION_OPERATORS
        elif token.type == tokenize.NUMBER:
            ok = len(token.string) <= 20
        elif token.type == tokenize.STRING:
            ok = token.string[:1] in "'\"" and bool(_SYMBOL_NAME.match(token.string[1:-1]))
        else:
            ok = token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
        if not ok:
            raise refused


# ------------------------------------------------------------------ guards

# What torch's ShapeGuardPythonPrinter writes: sizes of inputs (L['x'].size()[0]), arithmetic,
# comparisons, and a few math / builtin / torch.sym_* functions.
_GUARD_NODES = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.BinOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.LShift,
    ast.RShift,
    ast.BitAnd,
    ast.BitOr,
    ast.BitXor,
    ast.UnaryOp,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.Invert,
    ast.Constant,
    ast.Subscript,
    ast.Call,
    ast.Attribute,
    ast.Name,
    ast.Load,
)
_GUARD_FUNCTIONS = frozenset({"abs", "max", "min", "round", "int", "float"})
_GUARD_ATTRIBUTES = {
    "math": frozenset(
        {
            "floor",
            "ceil",
            "trunc",
            "sqrt",
            "log2",
            "inf",
            "pi",
            "e",
            "cos",
            "sin",
            "tan",
            "acos",
            "asin",
            "atan",
            "cosh",
            "sinh",
            "tanh",
        }
    ),
    "torch": frozenset({"sym_float", "sym_int", "sym_max", "sym_min", "_sym_sqrt", "sym_not", "sym_ite"}),
}
_TENSOR_METHODS = frozenset({"size", "stride", "storage_offset"})
_GUARD_KEY = re.compile(r"^[A-Za-z_]\w{0,199}$", re.ASCII)


def check_guard(guard: str) -> None:
    """One ``guards_code`` string: a plain guard expression (``.module()`` execs it as Python)."""
    refused = Refused(
        f"the program holds guard code {guard[:100]!r} that is not a plain comparison of input "
        "sizes (ExportedProgram.module() would run it as Python): refused"
    )
    if len(guard) > 4096 or "\\" in guard or '"' in guard or "\n" in guard or "\r" in guard:
        raise refused
    try:
        tree = ast.parse(guard, mode="eval")
        nodes = list(ast.walk(tree))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise refused from None
    called = {id(node.func) for node in nodes if isinstance(node, ast.Call)}
    for node in nodes:
        if not isinstance(node, _GUARD_NODES):
            raise refused
        if isinstance(node, ast.Constant):
            ok = type(node.value) in (int, float, bool) or (
                isinstance(node.value, str) and bool(_GUARD_KEY.match(node.value)) and "__" not in node.value
            )
        elif isinstance(node, ast.Name):
            ok = node.id == "L" or node.id in _GUARD_ATTRIBUTES or (node.id in _GUARD_FUNCTIONS and id(node) in called)
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            ok = node.attr in _GUARD_ATTRIBUTES.get(owner, ()) or (
                owner not in _GUARD_ATTRIBUTES and node.attr in _TENSOR_METHODS and id(node) in called
            )
        elif isinstance(node, ast.Call):
            ok = not node.keywords and all(
                isinstance(arg, ast.expr) and not isinstance(arg, ast.Starred) for arg in node.args
            )
        elif isinstance(node, ast.Subscript):
            ok = isinstance(node.slice, ast.Constant)
        else:
            ok = True
        if not ok:
            raise refused


# ------------------------------------------------------------------ pytree specs

# Containers whose spec torch rebuilds without importing anything (defaultdict imports its
# factory's module; any context holding an {"__enum__": ...} object imports the enum's module).
_TREESPEC_TYPES = frozenset(
    {
        None,
        "builtins.tuple",
        "builtins.list",
        "builtins.dict",
        "collections.OrderedDict",
        "collections.namedtuple",
        "torch.fx.immutable_collections.immutable_list",
        "torch.fx.immutable_collections.immutable_dict",
    }
)
_CONTEXT_STRING = re.compile(r"^[\w.\- ]{0,200}$", re.ASCII)
_MAX_TREESPEC_BYTES = 4 << 20


def check_treespec(text: str) -> None:
    """A serialized pytree spec (``[1, {"type", "context", "children_spec"}]``) of plain containers."""
    refused = Refused(
        f"the program's input or output structure {text[:100]!r} is not made of plain tuples, lists "
        "and dicts (torch would import modules it names): refused"
    )
    if len(text) > _MAX_TREESPEC_BYTES:
        raise refused
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise refused from None
    if not (isinstance(document, list) and len(document) == 2 and document[0] == 1):
        raise refused
    stack = [document[1]]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise refused
        kind, context, children = node["type"], node["context"], node["children_spec"]
        if kind not in _TREESPEC_TYPES or not isinstance(children, list):
            raise refused
        if kind == "collections.namedtuple":
            if not (isinstance(context, str) and _ATTRIBUTE_PATH.match(context)):
                raise refused
        elif context is not None:
            _check_context(context, refused)
        stack.extend(children)


def _check_context(context: object, refused: Refused) -> None:
    """A context string is JSON of plain values: no objects (an object may be an ``__enum__`` import)."""
    if not isinstance(context, str):
        raise refused
    try:
        values = [json.loads(context)]
    except (ValueError, RecursionError):
        raise refused from None
    while values:
        value = values.pop()
        if isinstance(value, list):
            values.extend(value)
        elif isinstance(value, str):
            if not _CONTEXT_STRING.match(value):
                raise refused
        elif value is not None and type(value) not in (int, float, bool):
            raise refused


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
