"""The per-job child process: ``python -m workers.job_process <job dir>``.

It runs inside the job's sandbox (``workers.sandbox``), checks from inside that it is confined,
limits itself before it touches the upload, refuses models that call file or foreign operators,
runs the engine, writes the output model and its report under ``output/``, and tells its
supervisor what happened (``workers.job_protocol``). Exit status 0 means success.

``python -m workers.job_process --probe <dir>`` prints what the process can see (the worker's
start-up self-test of the sandbox) and exits.

``python -m workers.job_process --warm <dir>`` is a pre-started one (``workers.warm_sandbox``): it
imports torch and the engine, says ``warm``, and waits on stdin until the supervisor has put a job's
files in ``<dir>``; from there it is a job process like any other. Stdin closed without a job: it exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from modelpress.config import Settings
from modelpress.storage import JobFiles
from workers import job_protocol as protocol


def main(argv: list[str]) -> int:
    if argv[1] == "--probe":
        print(json.dumps(confinement_facts(Path(argv[2]))))
        return 0
    job_dir = Path(argv[-1])
    channel = protocol.Channel.from_env()
    if argv[1] == "--warm" and not _wait_for_job(channel):
        return 0
    channel.send(protocol.STARTED)  # first: from here on, an early end is this job's, not the sandbox's set-up
    settings = Settings.from_env()
    _die_with_parent(confined=settings.sandbox == "on")
    facts = confinement_facts(job_dir)
    try:
        if settings.sandbox == "on":
            from workers.sandbox import confinement_gaps

            gaps = confinement_gaps(facts, settings)
            if gaps:
                unavailable = protocol.sandbox_unavailable("; ".join(gaps))  # a problem: its slug ends its type
                channel.fail({**unavailable, "slug": unavailable["type"].rsplit("/", 1)[1]})
                return 1
        _limit_resources(settings, job_dir)  # warm or cold, from the job's own inputs, before reading them
        return _compress(job_dir, settings, facts, channel)
    finally:
        channel.close()


def _wait_for_job(channel: protocol.Channel) -> bool:
    """A pre-started process: import what a job needs, say so, then wait for one (one line on stdin).

    No upload is in reach before the hand-over, so importing before ``_limit_resources`` runs no job
    code outside the limits; they are set after it from the job's inputs, exactly as for a cold process."""
    settings = Settings.from_env()
    _die_with_parent(confined=settings.sandbox == "on")
    _import_engine(settings)
    channel.send(protocol.WARM)  # line-buffered: sent now
    handed = os.read(0, 64)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the job then sees what a cold process sees on stdin
    os.close(null)
    return bool(handed)


def _import_engine(settings: Settings) -> None:
    import torch

    torch.set_num_threads(settings.job_threads)
    # The rest of what a job imports: the engine, the operator check, the device facts.
    import workers.engine.formats.program_check
    import workers.engine.formats.torchscript
    import workers.engine.run.pipeline
    import workers.sandbox  # noqa: F401


def _compress(job_dir: Path, settings: Settings, facts: dict[str, Any], channel: protocol.Channel) -> int:
    # Imported after the limits, so even torch's import runs inside them.
    from modelpress.options import job_options
    from modelpress.spec import parse_spec
    from modelpress.storage import read_json, write_json_atomic

    files = JobFiles(job_dir)
    try:
        _import_engine(settings)  # already done by a pre-started process
        from workers.engine.run.pipeline import compress

        channel.send(protocol.READY)
        data_path = files.input_data if files.input_data.exists() else None
        student_path = files.input_student if files.input_student.exists() else None
        spec = parse_spec(read_json(files.spec), has_data=data_path is not None, has_student=student_path is not None)
        options = job_options(spec)  # parsed once: the engine reads these typed options, never the mapping
        if settings.op_check != "off":
            _check_programs([files.input_model, student_path])
        report = compress(
            files.input_model,
            options,
            files.output_model,
            data_path=data_path,
            progress=channel.progress,
            student_path=student_path,
        )
        from workers.sandbox import device_facts

        report["device"] = device_facts()
        report["sandbox"] = {
            "mode": settings.sandbox,
            **facts,
            "environment": sorted(os.environ),
            "limits": {"resident_mb": settings.job_memory_mb, "address_space_mb": settings.job_address_space_mb},
        }
        # The peak of this process (the supervisor's limit counts the whole tree; bubblewrap adds ~2 MB).
        report["resources"] = {
            "peak_resident_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
            "memory_limit_mb": settings.job_memory_mb,
        }
        write_json_atomic(files.report, report)
        channel.send(protocol.SUCCEEDED)
        return 0
    except Exception as error:  # anything is still this job's failure, reported readably
        if isinstance(getattr(error, "report", None), dict):  # a search that missed its target lists its trials
            write_json_atomic(files.report, error.report)
        channel.fail(protocol.failure_of(error, settings))
    return 1


def confinement_facts(job_dir: Path) -> dict[str, Any]:
    """What this process can reach, seen from inside: the network, other processes, the data directory."""
    interfaces = sorted(name for _, name in socket.if_nameindex())
    others = [name for name in interfaces if name != "lo"]
    visible = []  # what the job directory's two parents (``jobs/`` and the data directory) hold besides it
    for parent, child in ((job_dir.parent, job_dir.name), (job_dir.parent.parent, job_dir.parent.name)):
        try:
            visible += [entry for entry in os.listdir(parent) if entry != child]
        except OSError:
            pass
    network = f"not isolated: interfaces {', '.join(others)}" if others else "isolated"
    probe = os.environ.get(protocol.NETWORK_PROBE)
    if probe:
        host, _, port = probe.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            network = f"not isolated: connected to {probe}"
            probe_result = "connected"
        except OSError as error:
            probe_result = f"connection to {probe} failed ({error.strerror or error})"
    from workers.seccomp_probe import state_of_this_process

    return {
        "network": network,
        "network_probe": probe_result if probe else "not tried",
        "seccomp": state_of_this_process(),
        "processes": sum(1 for entry in os.listdir("/proc") if entry.isdigit()),
        "privileges": _privileges(),
        "data_dir_visible": bool(visible),
        # A sandbox is never reused (workers/warm_sandbox.py): its own PID namespace, an empty /tmp.
        "pid_namespace": _namespace("pid"),
        "tmp_entries": _tmp_entries(job_dir),
    }


def _privileges() -> dict[str, str]:
    """What /proc says of this process's capabilities (hex masks) and ``no_new_privs``."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    wanted = ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs")
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines) if name in wanted}


def _tmp_entries(job_dir: Path) -> int:
    """Entries in /tmp besides the folders on the way to a bound path (a data directory or runtime under
    /tmp, as in the tests, is mounted over the private /tmp): 0 in a fresh sandbox."""
    bound = [Path(path).resolve() for path in (job_dir, sys.prefix, *sys.path) if path]
    return sum(1 for entry in os.listdir("/tmp") if not any(path.is_relative_to(Path("/tmp", entry)) for path in bound))


def _namespace(kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None


def _check_programs(paths: list[Path | None]) -> None:
    """Walk every method graph of each uploaded model before any of its code runs on inputs.

    A ``.pt2`` program is checked by ``exported.load_program`` (its layout, pickles and operators,
    from the archive's JSON graph) every time it is loaded, before torch reads it."""
    from modelpress.formats import EXPORTED, model_format
    from workers.engine.formats.program_check import check_module
    from workers.engine.formats.torchscript import load_model

    for path in paths:
        if path is not None and model_format(path) != EXPORTED:
            check_module(load_model(path))


def _limit_resources(settings: Settings, job_dir: Path) -> None:
    """Address space, CPU seconds, file size and processes: a runaway model fails its own job only.

    The file size cap is what ``output/`` may hold in all (``job_protocol.output_limit_bytes``) or,
    when larger, the job's memory limit: files in ``/tmp`` are bounded by its size (the job's memory,
    where they are counted), and the compiler that AOTInductor runs there writes files (a
    precompiled header of torch's headers) larger than a small model's output bound. The supervisor
    bounds ``output/``'s total, which several files could otherwise reach.

    The memory limit proper is on resident memory, enforced by the supervisor (``workers.memory``);
    the address-space cap here is a loose backstop that fails one huge allocation at once.

    RLIMIT_NPROC counts every process and thread of this user, so the cap is what the user
    runs now plus room for torch's threads (root ignores it; a service user does not).
    """
    cpu_seconds = settings.job_timeout_s * settings.job_threads + 60
    for limit, value in (
        (resource.RLIMIT_AS, settings.job_address_space_mb << 20),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, max(protocol.output_limit_bytes(JobFiles(job_dir)), settings.job_memory_mb << 20)),
        (resource.RLIMIT_NPROC, _user_tasks() + 256),
    ):
        _soft, hard = resource.getrlimit(limit)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(limit, (value, hard))


def _user_tasks() -> int:
    """Processes and threads this user runs now (what RLIMIT_NPROC counts)."""
    uid, count = str(os.getuid()), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            if fields["Uid"].split()[0] == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return count


def _die_with_parent(confined: bool) -> None:
    """Ask Linux to kill this process if its parent dies (PR_SET_PDEATHSIG).

    In the sandbox the parent is bubblewrap's PID 1 (started with --die-with-parent).
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    if not confined and os.getppid() == 1:  # the supervisor died before the request took effect
        os._exit(1)


if __name__ == "__main__":
    status = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written (atomically) and said by now: skip tearing torch down, which takes a
    # noticeable part of a small job (its threads, its modules' finalizers), and which nobody waits for.
    os._exit(status)
