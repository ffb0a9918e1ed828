"""A model's outputs as named tensors: tensors, tuples, lists and dicts (nested) all look alike.

Names are paths: ``output`` for a plain tensor, ``0``, ``1`` ... for tuple or list items, a dict's
key for its entries, joined by dots when nested (``1.logits``). Non-tensor leaves (None, numbers,
strings) are not outputs to compare or train on.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.engine.errors import InvalidInput


def named_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``output`` with its path, in the model's order (dicts keep insertion order)."""
    if isinstance(output, torch.Tensor):
        return [("output", output)]
    return list(_walk(output, ""))


def select_output(output: Any, choice: int | str | None) -> torch.Tensor:
    """The tensor training works on: ``choice`` indexes a tuple/list output or keys a dict; None: the first tensor."""
    if choice is None:
        tensors = named_outputs(output)
        if not tensors:
            raise InvalidInput(f"the model's output ({type(output).__name__}) holds no tensor to train on")
        return tensors[0][1]
    if isinstance(output, dict):
        if choice not in output:
            raise InvalidInput(
                f"spec.output is {choice!r} but the model's dict output has the keys "
                f"{', '.join(repr(key) for key in output)}"
            )
        picked = output[choice]
    elif isinstance(output, (tuple, list)):
        if not isinstance(choice, int) or not 0 <= choice < len(output):
            raise InvalidInput(
                f"spec.output is {choice!r} but the model returns a {type(output).__name__} of "
                f"{len(output)} items: give an index from 0 to {len(output) - 1}"
            )
        picked = output[choice]
    else:
        if choice != 0:
            raise InvalidInput(f"spec.output is {choice!r} but the model returns a single tensor (use 0 or null)")
        picked = output
    tensors = named_outputs(picked)
    if not tensors:
        raise InvalidInput(f"spec.output {choice!r} selects a {type(picked).__name__}, which holds no tensor")
    return tensors[0][1]


def _walk(output: Any, prefix: str):
    if isinstance(output, torch.Tensor):
        yield prefix, output
    elif isinstance(output, (tuple, list)):
        for index, item in enumerate(output):
            yield from _walk(item, f"{prefix}.{index}" if prefix else str(index))
    elif isinstance(output, dict):
        for key, item in output.items():
            yield from _walk(item, f"{prefix}.{key}" if prefix else str(key))
