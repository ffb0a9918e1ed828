"""The per-job child process: ``python -m workers.job_process <job dir>``.

It limits itself before it touches the upload, runs the engine, writes the output
model and ``report.json``, and tells its supervisor what happened as JSON lines on the
file descriptor ``MODELPRESS_PROGRESS_FD``. Exit status 0 means success.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    job_dir = Path(argv[1])
    channel = os.fdopen(int(os.environ["MODELPRESS_PROGRESS_FD"]), "w", buffering=1)
    _die_with_parent()
    network = _leave_network()
    _limit_resources()

    # Imported after the limits, so even torch's import runs inside them.
    from modelpress.spec import parse_spec
    from modelpress.storage import JobFiles, read_json, write_json_atomic
    from workers.compression.errors import CompressionError, OutOfMemory

    def send(event: str, **fields: Any) -> None:
        channel.write(json.dumps({"event": event, **fields}) + "\n")

    def progress(stage: str, fraction: float) -> None:
        send("progress", stage=stage, progress=round(min(max(fraction, 0.0), 1.0), 4))

    files = JobFiles(job_dir)
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("MODELPRESS_JOB_THREADS", "2")))
        from workers.compression.pipeline import compress

        data_path = files.input_data if files.input_data.exists() else None
        student_path = files.input_student if files.input_student.exists() else None
        spec = parse_spec(read_json(files.spec), has_data=data_path is not None, has_student=student_path is not None)
        report = compress(files.input_model, spec, files.output_model, data_path=data_path, progress=progress,
                          student_path=student_path)
        report["sandbox"] = {"network": network, "environment": sorted(os.environ),
                             "limits": {"address_space_mb": int(os.environ.get("MODELPRESS_JOB_MEMORY_MB", "8192"))}}
        write_json_atomic(files.report, report)
        send("succeeded")
        return 0
    except OutOfMemory:
        send("failed", slug="out-of-memory", title="Out of memory", detail=_memory_message())
    except CompressionError as error:
        send("failed", slug=error.slug, title=error.title, detail=str(error))
    except MemoryError:
        send("failed", slug="out-of-memory", title="Out of memory", detail=_memory_message())
    except RuntimeError as error:
        if "can't allocate memory" in str(error) or "not enough memory" in str(error):
            send("failed", slug="out-of-memory", title="Out of memory", detail=_memory_message())
        else:
            send("failed", slug="compression-failed", title="Compression failed", detail=_first_line(error))
    except Exception as error:  # anything else is still this job's failure, reported readably
        send("failed", slug="compression-failed", title="Compression failed",
             detail=f"{type(error).__name__}: {_first_line(error)}")
    finally:
        channel.flush()
    return 1


def _limit_resources() -> None:
    """Address space, CPU seconds, file size and processes: a runaway model fails its own job only.

    RLIMIT_NPROC counts every process and thread of this user, so the cap is what the user
    runs now plus room for torch's threads (root ignores it; a service user does not).
    """
    memory = int(os.environ.get("MODELPRESS_JOB_MEMORY_MB", "8192")) << 20
    cpu_seconds = int(os.environ.get("MODELPRESS_JOB_TIMEOUT_S", "3600")) * int(os.environ.get("MODELPRESS_JOB_THREADS", "2")) + 60
    for limit, value in (
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, 16 << 30),
        (resource.RLIMIT_NPROC, _user_tasks() + 256),
    ):
        soft, hard = resource.getrlimit(limit)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(limit, (value, hard))


def _leave_network() -> str:
    """Move into a new, empty network namespace (only a downed loopback), where the kernel allows it.

    Root can create one directly; other users need an unprivileged user namespace first, in which
    this process is mapped to its own uid so its files stay reachable.
    """
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError as error:
        return f"not isolated: {error}"
    if libc.unshare(clone_newnet) == 0:
        return "isolated"
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(clone_newuser | clone_newnet) == 0:
        try:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        except OSError:
            pass
        return "isolated"
    return f"not isolated: unshare refused ({os.strerror(ctypes.get_errno())})"


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


def _die_with_parent() -> None:
    """Ask Linux to kill this process if its supervisor dies (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    if os.getppid() == 1:  # the supervisor died before the request took effect
        os._exit(1)


def _memory_message() -> str:
    limit = os.environ.get("MODELPRESS_JOB_MEMORY_MB", "?")
    return f"the model needs more memory than the job's limit of {limit} MB (MODELPRESS_JOB_MEMORY_MB)"


def _first_line(error: BaseException) -> str:
    from workers.compression.errors import summarize_torch_error

    return summarize_torch_error(error, limit=500)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
