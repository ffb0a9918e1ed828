"""Run an exported artifact on its own runtime, outside torch:

    python -m workers.engine.targets.runner <target> <artifact> <inputs.npz> <outputs.npz> [--time N]

reads ``input_0, input_1, ...`` from ``inputs.npz``, runs the artifact once and writes its outputs,
flattened, as ``output_0, output_1, ...``; ``--time N`` also prints the median latency of up to N
runs (after 3 warm-up runs) as JSON on stdout. Torch is never imported: ``executorch`` programs run
on ExecuTorch's C++ runtime through ``pte_run`` (build it with ``make pte-runner``; without it
ExecuTorch's Python bindings are used, and they import torch). Exit status 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workers.engine.targets.registry import TARGETS, target_module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.engine.targets.runner", description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("artifact", type=Path)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--time", type=int, default=0, metavar="N", help="also time up to N runs (median, ms)")
    arguments = parser.parse_args(argv)
    import numpy as np

    with np.load(arguments.inputs, allow_pickle=False) as stored:
        count = sum(1 for name in stored.files if name.startswith("input_"))
        inputs = [stored[f"input_{index}"] for index in range(count)]
    module = target_module(arguments.target)
    loaded = module.load(arguments.artifact)
    outputs = module.run(loaded, inputs)
    np.savez(arguments.outputs, **{f"output_{index}": value for index, value in enumerate(outputs)})
    if arguments.time:
        print(
            json.dumps(
                {"target": arguments.target, "median_ms": module.latency_ms(loaded, inputs, runs=arguments.time)}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
