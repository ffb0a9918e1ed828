"""Which operators a model may call: the one policy the API's code scan and the job's graph walk share.

A TorchScript model is a program. Most operators compute on tensors, but a few touch the world:
``aten::from_file`` maps any file the process can open into a tensor, ``aten::save`` writes one,
and operators of other namespaces (a custom ``torch.ops.foo.bar``, or torch's own distributed
``c10d`` ops) do whatever their library does. Three checks apply this policy:

- ``scan_source`` (here): the archive's ``code/`` text (what ``torch.jit.load`` compiles), without
  torch; the API runs it at submit (``modelpress.archive``).
- ``modelpress.pt2_program``: every operator a ``.pt2`` program's JSON graph names.
- ``workers.engine.formats.program_check.check_module``: every graph of every method of every
  submodule of the loaded model, with calls inlined, before ``forward`` ever runs; the job
  process runs it.

The policy lives in the shared library so that the API and the engine both use it without the
API importing the worker package. All of them only name the operator; they never echo what a
model might have read.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections import deque

# Operators of torch's own namespaces that touch files.
REFUSED_OPS = {
    "aten::from_file": "reads a file",
    "aten::save": "writes a file",
}
# Namespaces of operators (and TorchBind classes) that compute on tensors only. Everything else is
# refused: custom namespaces run foreign code, c10d / symm_mem / _c10d_functional talk to other
# processes over the network, debugprims loads tensors by name.
TORCH_NAMESPACES = frozenset(
    {
        "aten",
        "prim",
        "prims",
        "quantized",
        "_quantized",
        "quantization",
        "quantized_decomposed",
        "prepacked",
        "onednn",
        "mkldnn",
        "mkldnn_prepacked",
        "mkl",
        "xnnpack",
        "sparse",
        "profiler",
        "cuda",
        "_native",
    }
)
# What every refusal ends with, whichever check found it.
HINT = "models that read or write files, start processes or talk to other processes are refused"

_LAYOUT = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
# Every refusal below needs one of these names as a token (``torch.save``, ``ops.<ns>``,
# ``classes.<ns>``, ``getattr(torch, ...)``, any ``from_file``); a token is a whole word of the text.
_SUSPECT_NAMES = re.compile(r"\b(?:from_file|save|ops|classes|getattr)\b")


def refusal(op: str) -> str | None:
    """Why operator ``op`` (``namespace::name``) is refused, or None when it may run."""
    if op in REFUSED_OPS:
        return REFUSED_OPS[op]
    namespace = op.split("::", 1)[0]
    if namespace not in TORCH_NAMESPACES:
        return f"is outside torch's own operator namespaces ({namespace!r})"
    return None


def scan_source(text: str) -> str | None:
    """The first refused operator that TorchScript source ``text`` calls, as ``"op: why"``; None if clean.

    Reads tokens, not lines, so whitespace, comments or line breaks inside a dotted name
    (``torch .from_file``, ``(ops.\\n aten.from_file)``) do not hide a call. Refuses conservatively:
    any name ``from_file``, and ``getattr`` on ``torch`` or ``ops`` (a name a text scan cannot see).
    Streams the tokens, so memory stays that of the text. Python's tokenizer reads about 0.3 MB/s,
    so text in which none of the names that can lead to a refusal occurs is passed at once.
    """
    if not _SUSPECT_NAMES.search(text):
        return None
    recent: deque[str] = deque(maxlen=2)
    chain: list[str] = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in _LAYOUT:
                continue
            if token.type == tokenize.NAME:
                if list(recent) == ["getattr", "("] and token.string in ("torch", "ops"):
                    return f"getattr({token.string}, ...): a dynamically named operator cannot be checked"
                if recent and recent[-1] == "." and chain:
                    chain.append(token.string)
                else:
                    found = _chain_refusal(chain)
                    if found:
                        return found
                    chain = [token.string]
            elif token.string != ".":
                found = _chain_refusal(chain)
                if found:
                    return found
                chain = []
            recent.append(token.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "unreadable code: the archive's code does not tokenize as TorchScript source"
    return _chain_refusal(chain)


def unsafe_detail(finding: str) -> str:
    """The sentence for a refusal found by ``scan_source``."""
    return f"the model calls {finding}; {HINT}"


def _chain_refusal(chain: list[str]) -> str | None:
    if not chain:
        return None
    op = "aten::from_file" if "from_file" in chain else _operator(chain)  # no method of that name is harmless enough
    why = refusal(op) if op else None
    return f"{op}: it {why}" if why else None


def _operator(chain: list[str]) -> str | None:
    """``torch.x`` is ``aten::x``; ``ops.ns.x`` and ``torch.ops.ns.x`` are ``ns::x``; ``torch.classes.ns.C`` is ``ns::C``."""
    if chain[:2] == ["__torch__", "torch"]:
        chain = chain[1:]
    if chain[:1] == ["torch"] and len(chain) >= 2 and chain[1] in ("ops", "classes"):
        chain = chain[1:]
    if chain[:1] in (["ops"], ["classes"]) and len(chain) >= 3:
        return f"{chain[1]}::{chain[2]}"
    if chain[:1] == ["torch"] and len(chain) == 2:
        return f"aten::{chain[1]}"
    return None
