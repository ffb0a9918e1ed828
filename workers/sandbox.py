"""Confinement of the job process with bubblewrap (``bwrap``).

A TorchScript model is a program: ``torch.from_file`` alone reads any file the process can open.
So each job's process runs in new user, mount, PID, IPC, UTS and network namespaces where the
filesystem holds only what the job needs:

- its own job directory at its usual path: read-only, except ``output/`` (writable);
- a private ``/tmp``, a fresh ``/proc`` of its own PID namespace, a minimal ``/dev``;
- the runtime, read-only: ``/usr`` and the ``/lib*`` directories, the Python installation, the
  site-packages on ``sys.path``, the project's ``modelpress/`` and ``workers/`` packages and the
  few ``/etc`` files the dynamic loader reads.

Nothing else of the data directory (other jobs, uploads, the webhook master key, Redis' files),
no API keys file, no other process. The network namespace holds only a loopback interface.
A syscall filter (``workers.seccomp``) denies what a model never needs (ptrace, mounts, new
namespaces, keyrings, BPF, kernel modules...). When the worker has a GPU, its device nodes are
bound in (``gpu_devices``); the driver's libraries are under ``/usr``, which is bound already.
Failure to set any of this up fails the job (``sandbox-unavailable``); only ``MODELPRESS_SANDBOX=off``
runs jobs unconfined. See docs/architecture.md for why bubblewrap and what the host must allow.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelpress.config import Settings
from modelpress.storage import ARTIFACT_FILE_NAMES, JobFiles
from modelpress.worker_status import SandboxStatus
from workers import seccomp
from workers.job_protocol import network_probe

log = logging.getLogger("modelpress.sandbox")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("modelpress", "workers")  # what the job process imports from the project, and nothing else of it
SANDBOX_UID = 65534  # "nobody" inside the user namespace; mapped to the worker's own uid outside
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin")
PROBE_TIMEOUT_S = 60
# What the CUDA runtime opens (NVIDIA), and the ROCm / DRM nodes of other GPUs; bound when present.
GPU_DEVICE_PATTERNS = (
    "/dev/nvidiactl",
    "/dev/nvidia[0-9]*",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
    "/dev/nvidia-caps",
    "/dev/kfd",
    "/dev/dri",
)


@contextmanager
def confined(
    settings: Settings, files: JobFiles, argv: list[str], output_source: Path | None = None
) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """The command that runs ``argv`` for the job in ``files``, and the descriptors to pass to it.

    The syscall filter travels to bubblewrap on a descriptor: start the command (``pass_fds``)
    inside the ``with``; the descriptor is closed when it ends. Sandbox off: ``argv`` as is, none.
    ``output_source``: the host folder bound as ``output/`` (default: the job's own ``output/``).
    """
    if settings.sandbox == "off":
        yield argv, ()
        return
    program = seccomp.program_fd()
    try:
        yield job_command(settings, files, argv, seccomp_fd=program, output_source=output_source), (program,)
    finally:
        os.close(program)


def job_command(
    settings: Settings,
    files: JobFiles,
    argv: list[str],
    seccomp_fd: int | None,
    devices: Sequence[str] | None = None,
    output_source: Path | None = None,
) -> list[str]:
    """The bubblewrap command line (use ``confined``): ``seccomp_fd`` holds the filter (None: none),
    ``devices`` are the device nodes bound in (None: this host's GPU, ``gpu_devices()``)."""
    if settings.sandbox == "off":
        return argv
    files.output_model.parent.mkdir(parents=True, exist_ok=True)
    root = str(files.root)
    devices = gpu_devices() if devices is None else devices
    return [
        settings.bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",  # no nested user namespace from which to gain capabilities again
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--cap-drop",
        "ALL",
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--die-with-parent",
        "--hostname",
        "modelpress-job",
        # The private /tmp first: a runtime (a checkout with its venv) or a data directory under /tmp,
        # as in CI and the tests, is then mounted on top of it instead of being hidden by it.
        # /tmp holds at most the job's memory limit, and what it holds counts into that limit (workers/memory.py).
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(settings.job_memory_mb << 20),
        "--tmpfs",
        "/tmp",
        *_runtime_mounts(settings),
        *[argument for device in devices for argument in ("--dev-bind-try", device, device)],  # after --dev /dev
        "--ro-bind",
        root,
        root,
        "--bind",
        str(output_source or files.output_model.parent),
        str(files.output_model.parent),
        "--chdir",
        root,
        "--",
        *argv,
    ]


def fingerprint(settings: Settings) -> tuple[str, ...]:
    """What the sandbox's command holds besides the job's folder (the runtime's mounts, the GPU nodes): a
    process started under another fingerprint was not started as a job's process would be now."""
    return (*_runtime_mounts(settings), *gpu_devices())


def gpu_devices() -> list[str]:
    """This host's GPU device nodes (``GPU_DEVICE_PATTERNS``) that exist; none on a machine without one."""
    return sorted(path for pattern in GPU_DEVICE_PATTERNS for path in glob.glob(pattern))


def device_facts() -> dict[str, Any]:
    """Seen from inside the job: the GPU device nodes it has and whether torch can use CUDA on them."""
    import torch

    available = torch.cuda.is_available()
    return {
        "gpu_device_nodes": gpu_devices(),
        "cuda_available": available,
        "cuda_device": torch.cuda.get_device_name(0) if available else None,
    }


def confirm_outputs(files: JobFiles) -> str | None:
    """After the job process ended: keep its output only if it is plain files; else say why.

    The confined process may have made ``output/model.pt`` a symbolic link to a host path, a
    FIFO, or left other files (say a forged ``model.pt.gz``) that the API would serve; outside the
    sandbox those would be followed or served, so they are refused or removed here.
    """
    directory = files.output_model.parent
    if not directory.exists():
        return None
    kept = {files.output_model.name, files.report.name, *ARTIFACT_FILE_NAMES}  # artifacts: export targets
    for entry in directory.iterdir():
        if entry.name not in kept:
            _remove(entry)
            continue
        mode = entry.lstat().st_mode
        if not stat.S_ISREG(mode):
            _remove(entry)
            return f"the job left output/{entry.name} as something other than a plain file"
    return None


def self_test(settings: Settings) -> SandboxStatus:
    """Run the confined job process once in probe mode; it checks its own confinement from inside.

    The worker publishes the result (``modelpress.worker_status``) for the API's ``/readyz``."""
    now = time.time()
    if settings.sandbox == "off":
        return SandboxStatus(
            "off", "MODELPRESS_SANDBOX=off: jobs run unconfined, with the worker's files and network", now
        )
    probe_parent = settings.data_dir / "sandbox-probe"
    probe_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=probe_parent) as directory:
        files = JobFiles(Path(directory))
        argv = [sys.executable, "-m", "workers.job_process", "--probe", str(files.root)]
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(PROJECT_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            **network_probe(settings),
        }
        try:
            with confined(settings, files, argv) as (command, fds):
                done = subprocess.run(
                    command,
                    env=env,
                    cwd=directory,
                    capture_output=True,
                    text=True,
                    timeout=PROBE_TIMEOUT_S,
                    stdin=subprocess.DEVNULL,
                    pass_fds=fds,
                )
        except (OSError, subprocess.TimeoutExpired) as error:
            return SandboxStatus("unavailable", f"{settings.bwrap} could not be run: {error}", now)
    if done.returncode != 0:
        return SandboxStatus("unavailable", setup_error(done.stderr) or f"the probe exited with {done.returncode}", now)
    try:
        facts = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return SandboxStatus("unavailable", "the probe printed no facts", now)
    problems = confinement_gaps(facts, settings)
    if problems:
        return SandboxStatus("unavailable", "; ".join(problems), now)
    return SandboxStatus(
        "confined",
        "bubblewrap: own user, mount, PID, IPC and network namespaces and a syscall "
        "filter; only the job directory and the read-only runtime are visible",
        now,
    )


def confinement_gaps(facts: dict[str, Any], settings: Settings) -> list[str]:
    """What the process's own view (``workers.job_process.confinement_facts``) shows is not confined."""
    gaps = []
    if facts.get("network") != "isolated":
        gaps.append(f"the job process has network access ({facts.get('network')})")
    if facts.get("data_dir_visible"):
        gaps.append("the job process sees the data directory")
    if facts.get("processes", 0) > 3:
        gaps.append(f"the job process sees {facts['processes']} processes (no own PID namespace)")
    if facts.get("seccomp") != "filtered":
        gaps.append(f"the job process has no syscall filter ({facts.get('seccomp')})")
    privileges = facts.get("privileges") or {}
    held = {name: mask for name, mask in privileges.items() if name.startswith("Cap") and mask.strip("0")}
    if held or set(privileges) != {"CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs"}:
        gaps.append(f"the job process holds capabilities ({held or 'unknown'})")
    if privileges.get("NoNewPrivs") != "1":
        gaps.append("the job process can gain privileges (no_new_privs unset)")
    return gaps


def setup_error(stderr: str) -> str | None:
    """bubblewrap's own complaint (lines starting ``bwrap:``), written before any model code runs."""
    lines = [line.strip() for line in stderr.splitlines() if line.startswith("bwrap:")]
    return lines[-1][:300] if lines else None


def setup_error_in(process_log: Path) -> str | None:
    """bubblewrap's complaint in a job's process log (its last 64 KB)."""
    try:
        with open(process_log, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - (64 << 10)))
            return setup_error(handle.read().decode("utf-8", errors="replace"))
    except OSError:
        return None


def _runtime_mounts(settings: Settings) -> list[str]:
    mounts: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            mounts += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            mounts += ["--ro-bind", path, path]
    for path in _ETC_FILES:
        mounts += ["--ro-bind-try", path, path]
    for path in _python_paths(settings):
        mounts += ["--ro-bind", path, path]
    for package in PACKAGES:
        mounts += ["--ro-bind", str(PROJECT_ROOT / package), str(PROJECT_ROOT / package)]
    return mounts


def _python_paths(settings: Settings) -> list[str]:
    """The interpreter's installation, the virtual environment and every import root on ``sys.path``.

    An entry that holds the data directory or the project root (which may hold the data directory)
    is left out: the project's own packages are mounted one by one.
    """
    data_dir = settings.data_dir.resolve()
    candidates = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).parent}
    candidates.update(Path(entry) for entry in sys.path if entry)
    chosen: list[Path] = []
    for candidate in candidates:
        for path in {candidate, candidate.resolve()}:
            if (
                not path.is_dir()
                or path == PROJECT_ROOT
                or path in (data_dir, *data_dir.parents)
                or any(path == Path(system) or Path(system) in path.parents for system in _SYSTEM_DIRS)
            ):
                continue  # the project root and the data directory's ancestors hold data; system dirs are bound already
            chosen.append(path)
    # Parents before children, so a child bind is not hidden by its parent's.
    return [str(path) for path in sorted(set(chosen), key=lambda p: len(p.parts))]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
