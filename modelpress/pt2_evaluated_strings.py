"""The strings of a ``.pt2`` program that torch evaluates as Python while loading, and what each must
be (``modelpress.pt2_program`` walks the program and hands each of them here): symbolic-shape
expressions (``sympy.sympify``), ``guards_code`` (``exec``\\ ed by ``.module()``) and pytree specs
(their JSON object hook imports modules). ``Refused`` is what every check of the program raises.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize


class Refused(Exception):
    """Why the program is refused: a sentence for the user."""


ATTRIBUTE_PATH = re.compile(r"^(?:\w{1,200}(?:\.\w{1,200}){0,50})?$", re.ASCII)
_SYMBOL_NAME = re.compile(r"^[a-z]{1,8}\d{1,9}$")


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
            if not (isinstance(context, str) and ATTRIBUTE_PATH.match(context)):
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
