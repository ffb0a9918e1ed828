"""Every job judges its own result: warnings for results that succeeded but may not be what was wanted.

A job whose method changed nothing, or whose outputs no longer resemble the original's, still
succeeds (the file is valid), but says so in ``report["warnings"]``, which the service copies
into the job resource and the command line prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelpress.options import Step

# Outputs count as collapsed below these (per output): a classifier that agrees with the original
# on fewer than half the inputs, or outputs pointing elsewhere (cosine 0.9 is about 26 degrees).
COLLAPSE_TOP1 = 0.5
COLLAPSE_COSINE = 0.9
# Dynamic int8 that reaches fewer of the model's weights than this is worth a word before the next run:
# the file barely shrinks and the int8 layers rarely pay for their activation quantization.
MIN_COVERAGE = 0.10


def warnings_for(step: Step, details: Mapping[str, Any], fidelity: Mapping[str, Any], random_inputs: bool) -> list[str]:
    """Warnings about a finished compression, from what the method did and how the outputs compare."""
    warnings = [str(w) for w in details.get("warnings", [])]  # a method's own (e.g. random calibration data)
    # Other modes (static) judge their own outcome and say so in their details' warnings.
    method = step.method
    dynamic = method == "quantize" and step.options.mode == "dynamic"
    if dynamic and "quantized_modules" in details and not details["quantized_modules"]:
        modules = ", ".join(step.options.modules) or "the selected types"
        warnings.append(
            f"nothing was quantized: the model has no weight of the selected module types ({modules}) "
            "outside 'exclude', so the result computes exactly what the original does "
            "(convolutional networks need static quantization or structured pruning)"
        )
    coverage = details.get("coverage") or {}
    if dynamic and details.get("quantized_modules") and coverage.get("fraction", 1.0) < MIN_COVERAGE:
        warnings.append(_coverage_warning(coverage))
    if method == "prune" and details.get("structured") is False and not details.get("layers"):
        warnings.append(
            "nothing was pruned: the model has no weight of the selected module types outside "
            "'exclude', so the result is the original model"
        )
    return warnings + collapse_warnings(method, fidelity, random_inputs)


def _coverage_warning(coverage: Mapping[str, Any]) -> str:
    """Dynamic int8 covered few weights: say how few, where the rest are, and what would reach them."""
    float_by_type = coverage.get("float_by_type") or {}
    largest = max(float_by_type, key=float_by_type.get, default=None)
    weights = max(int(coverage.get("weights") or 0), 1)
    where = f"; {largest} layers hold {float_by_type[largest] / weights:.0%} of them and stay float" if largest else ""
    conv = largest is not None and largest.startswith(("Conv", "ConvTranspose"))
    helps = (
        "static int8 (quantize.mode 'static', with a data file to calibrate on) quantizes convolutions"
        if conv
        else "static int8 (quantize.mode 'static') or pruning may reach them"
    )
    return (
        f"dynamic int8 covered only {coverage.get('fraction', 0.0):.1%} of the weights "
        f"({coverage.get('quantized_weights', 0)} of {coverage.get('weights', 0)}){where}: the model barely "
        f"shrinks and may run slower; {helps}"
    )


def collapse_warnings(method: str, fidelity: Mapping[str, Any], random_inputs: bool) -> list[str]:
    """A warning per output whose agreement or cosine with the original's fell under the thresholds."""
    warnings = []
    where = (
        " (measured on random inputs of the declared shape; upload a data file to measure on real inputs)"
        if random_inputs
        else ""
    )
    for output in fidelity.get("outputs", []):
        reasons = []
        if output.get("top1_agreement") is not None and output["top1_agreement"] < COLLAPSE_TOP1:
            reasons.append(f"top-1 agreement {output['top1_agreement']:.3f} (under {COLLAPSE_TOP1})")
        # A distilled student learns softened scores, so its logits' scale differs by design: only
        # agreement counts for it.
        # Outputs equal to the original's (max error 0) never collapsed, whatever their cosine says
        # (all zeros, as from a head initialised to zeros, have no direction).
        identical = output.get("max_abs_error") == 0.0
        if method != "distill" and not identical and output["cosine_similarity"] < COLLAPSE_COSINE:
            reasons.append(f"cosine similarity {output['cosine_similarity']:.3f} (under {COLLAPSE_COSINE})")
        if reasons:
            warnings.append(
                f"outputs collapsed: output '{output['name']}' has {' and '.join(reasons)} "
                f"against the original{where}; use a smaller amount, fine-tuning or another method"
            )
    return warnings
