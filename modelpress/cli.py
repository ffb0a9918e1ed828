"""The ``modelpress`` command: submit, watch, download and manage compression jobs.

Exit status: 0 the job succeeded (or the command worked), 1 the job failed, 3 it was
cancelled, 4 the service refused the request, 2 bad usage. Progress bars go to stderr and
only when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from modelpress.client import ChecksumMismatch, Client, ModelPressError
from modelpress.spec import PACKAGES, REGISTRY
from modelpress.targets import TARGETS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_REFUSED = 0, 1, 2, 3, 4


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    client = Client(args.url, args.api_key)
    try:
        return args.run(client, args)
    except ModelPressError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except ChecksumMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------------------- commands


def _submit(client: Client, args: argparse.Namespace) -> int:
    spec = _spec_from(args)
    bar = ProgressBar("upload", sys.stderr)
    job = client.submit(
        args.model,
        spec,
        data=args.data,
        student=args.student,
        callback_url=args.callback_url,
        idempotency_key=args.idempotency_key,
        progress=bar.update,
    )
    bar.close()
    if not args.wait:
        _print_json(job)
        return EXIT_OK
    return _watch(client, job, args.timeout, args.out)


def _status(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.job)
    _print_json(job)
    return _exit_for(job)


def _list(client: Client, args: argparse.Namespace) -> int:
    for index, job in enumerate(client.jobs(state=args.state)):
        if index >= args.limit:
            break
        print(
            f"{job['id']}  {job['state']:<9}  {job['spec']['method']:<8}  {job['created_at']}  "
            f"{(job.get('input') or {}).get('filename', '')}"
        )
    return EXIT_OK


def _download(client: Client, args: argparse.Namespace) -> int:
    bar = ProgressBar("download", sys.stderr)
    path = client.download(args.job, args.out, progress=bar.update, target=args.target)
    bar.close()
    print(f"saved {path} (sha256 verified)")
    return EXIT_OK


def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job)
    print(
        "deleted"
        if job is None
        else f"{job['id']}: {job['state']}" + (" (cancel requested)" if job and job.get("cancel_requested") else "")
    )
    return EXIT_OK


def _report(client: Client, args: argparse.Namespace) -> int:
    _print_json(client.report(args.job))
    return EXIT_OK


def _watch(client: Client, job: dict[str, Any], timeout: float, out: str | None) -> int:
    live = sys.stderr.isatty()

    def show(current: dict[str, Any]) -> None:
        if live:
            percent = 100 * float(current.get("progress") or 0)
            sys.stderr.write(
                f"\r{current['id']} {current['state']:<9} {percent:5.1f}%  {current.get('stage') or '':<40}"
            )
            sys.stderr.flush()

    final = client.wait(job, timeout=timeout, on_update=show)
    if live:
        sys.stderr.write("\n")
    status = _exit_for(final)
    if status != EXIT_OK:
        error = final.get("error") or {}
        print(
            f"job {final['id']} {final['state']}: {error.get('title', '')}: {error.get('detail', '')}".rstrip(": "),
            file=sys.stderr,
        )
        return status
    result = final["result"]
    print(
        f"job {final['id']} succeeded: {result['bytes']} bytes ({result['size_ratio']:.3f}x), "
        f"latency {_ratio(result.get('latency_ratio'))}, cosine {_number(result.get('cosine_similarity'))}"
    )
    for warning in final.get("warnings") or []:
        print(f"warning: {warning}")
    if out:
        bar = ProgressBar("download", sys.stderr)
        client.download(final, out, progress=bar.update)
        bar.close()
        print(f"saved {out} (sha256 verified)")
    return EXIT_OK


# ---------------------------------------------------------------------------- spec from options


def _spec_from(args: argparse.Namespace) -> dict[str, Any]:
    flags = [name for name, entry in REGISTRY.items() if entry.cli is not None]
    chosen = [name for name in ("spec", *flags) if getattr(args, name, None) is not None]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of {', '.join('--' + name for name in ('spec', *flags))}")
    if args.spec is not None:
        spec = json.loads(Path(args.spec).read_text())
    else:
        method = chosen[0]
        spec = {"method": method, method: REGISTRY[method].cli.options(getattr(args, method), args)}
    if args.input_shape:
        spec["input_shape"] = [int(n) for n in args.input_shape.split(",")]
    if args.input:
        spec["inputs"] = [_input_entry(text) for text in args.input]
    if args.output is not None:
        spec["output"] = int(args.output) if args.output.isdigit() else args.output
    if args.runtime is not None:
        spec["evaluation"] = {**spec.get("evaluation", {}), "runtime": args.runtime}
    if args.package is not None:
        spec["package"] = args.package
    for target in getattr(args, "target", None) or []:  # added to the spec file's own targets
        spec["targets"] = [*spec.get("targets", []), *([] if target in spec.get("targets", []) else [target])]
    return spec


def _input_entry(text: str) -> dict[str, Any]:
    """``8,3,32,32``, ``8,16:int64`` or ``8,16:int64:0:30000`` -> a spec ``inputs`` entry."""
    shape, _, rest = text.partition(":")
    entry: dict[str, Any] = {"shape": [int(n) for n in shape.split(",")]}
    parts = rest.split(":") if rest else []
    if parts:
        entry["dtype"] = parts[0]
    if len(parts) == 3:
        entry["low"], entry["high"] = float(parts[1]), float(parts[2])
    elif len(parts) not in (0, 1):
        raise ValueError(f"--input {text!r}: write SHAPE[:DTYPE[:LOW:HIGH]], e.g. 8,16:int64:0:30000")
    return entry


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


def _exit_for(job: dict[str, Any]) -> int:
    return {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}.get(job["state"], EXIT_OK)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


class ProgressBar:
    """A byte progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, label: str, stream: TextIO, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width
        self.live = stream.isatty()
        self._last = 0.0

    def update(self, done: int, total: int) -> None:
        if not self.live or (time.monotonic() - self._last < 0.1 and done < total):
            return
        self._last = time.monotonic()
        fraction = done / total if total else 1.0
        filled = int(self.width * fraction)
        self.stream.write(
            f"\r{self.label:>8} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{100 * fraction:5.1f}% {done / 1e6:8.1f}/{total / 1e6:.1f} MB"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelpress", description="Compress TorchScript or torch.export (.pt2) models with a ModelPress service."
    )
    parser.add_argument("--url", help="service address (default: $MODELPRESS_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default: $MODELPRESS_API_KEY)")
    commands = parser.add_subparsers(dest="command")

    submit = commands.add_parser("submit", help="upload a model and a spec")
    submit.add_argument("model")
    submit.add_argument("--spec", help="spec JSON file")
    for name, entry in REGISTRY.items():  # one flag per registered method
        if entry.cli is not None:
            submit.add_argument(f"--{name}", metavar=entry.cli.metavar, help=entry.cli.help)
    submit.add_argument("--structured", action="store_true", help="with --prune: remove whole channels")
    submit.add_argument("--input-shape", metavar="N,C,H,W", help="example input shape for inline specs")
    submit.add_argument(
        "--input",
        action="append",
        metavar="SHAPE[:DTYPE[:LOW:HIGH]]",
        help="one per positional input, in order, e.g. --input 8,3,32,32 --input 8,16:int64:0:30000",
    )
    submit.add_argument("--output", metavar="INDEX|KEY", help="the output fine-tuning and distillation train on")
    submit.add_argument(
        "--runtime",
        choices=("eager", "compile", "aoti"),
        help="how a .pt2 program is timed (evaluation.runtime; compile/aoti need g++ on the worker)",
    )
    submit.add_argument(
        "--package",
        choices=PACKAGES,
        help="a .pt2 upload's download: the program (default) or an AOTInductor package (aoti)",
    )
    submit.add_argument(
        "--target",
        action="append",
        choices=tuple(TARGETS),
        help="also export the compressed model for this runtime (repeatable; adds to the spec's targets)",
    )
    submit.add_argument("--data", help=".npz or .safetensors with 'inputs' (and 'labels')")
    submit.add_argument("--student", help="TorchScript student (with --distill upload)")
    submit.add_argument("--callback-url", help="URL that gets the job on each final state")
    submit.add_argument("--idempotency-key", help="repeat-safe submission key")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits (default 3600)")
    submit.add_argument("--out", help="with --wait: download the result here")
    submit.set_defaults(run=_submit)

    for name, run, help_text in (("status", _status, "show a job"), ("report", _report, "show a job's report")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("job")
        command.set_defaults(run=run)
    listing = commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(run=_list)
    download = commands.add_parser("download", help="download a compressed model (sha256 verified)")
    download.add_argument("job")
    download.add_argument("--out", required=True)
    download.add_argument("--target", choices=tuple(TARGETS), help="download this export target's artifact instead")
    download.set_defaults(run=_download)
    cancel = commands.add_parser("cancel", help="cancel a queued or running job, or delete a finished one")
    cancel.add_argument("job")
    cancel.set_defaults(run=_cancel)
    return parser


if __name__ == "__main__":
    sys.exit(main())
