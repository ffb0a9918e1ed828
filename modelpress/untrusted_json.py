"""JSON from clients, parsed only once its nesting is known to be shallow.

``json.loads`` recurses once per nested array or object, so a 20,000-deep ``[[[[...]]]]`` (40 KB,
well inside any size limit) raises ``RecursionError``, which no ``except ValueError`` catches: the
request ended in a 500. The depth is counted first, outside strings, in one pass over the text.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # a compression spec nests 6 levels (pipeline steps, their options, shapes)
# A JSON string (escapes included) or one bracket: strings are skipped whole, so "[[[" inside one does not count.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


class JsonTooDeep(ValueError):
    """The text nests arrays and objects deeper than allowed; ``str()`` says how deep."""


def nesting_depth(text: str | bytes, stop_above: int) -> int:
    """How deeply ``text`` nests arrays and objects, counting up to the first level above ``stop_above``."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    depth = deepest = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_above:
                    return deepest
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def loads_bounded(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads``, refusing (``JsonTooDeep``, a ``ValueError``) text nested deeper than ``max_depth``."""
    if nesting_depth(text, max_depth) > max_depth:
        raise JsonTooDeep(f"nested more than {max_depth} levels deep")
    return json.loads(text)
