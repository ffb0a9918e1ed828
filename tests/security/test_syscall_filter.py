"""The job's syscall filter (workers/seccomp.py) and device binds (workers/sandbox.py), under real bubblewrap.

Each denial is shown twice: inside the sandbox with the filter the call fails with EPERM, and in the
same sandbox without it (the positive control) the same call gets the kernel's own answer, so the
EPERM is the filter's and the probe really makes the call.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from modelpress.config import Settings
from modelpress.storage import JobFiles
from workers import sandbox, seccomp

X86_64_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
GENERIC_HEADER = Path("/usr/include/asm-generic/unistd.h")  # aarch64's table

# Each call is made so that it changes nothing when it is allowed: a missing pid, null pointers,
# flags 0, no keyring created. The raw clone returns in the child only if a namespace was made.
PROBE = r"""
import ctypes, errno, json, os, threading
from workers import seccomp_probe
calls = {
    "ptrace": ("ptrace", 16, 0x7FFFFFF0, 0, 0),                # PTRACE_ATTACH to a pid that does not exist
    "unshare": ("unshare", 0),                                  # no flags: a no-op when allowed
    "mount": ("mount", 0, 0, 0, 0, 0),                          # null pointers
    "keyctl": ("keyctl", 0, -1, 0),                             # KEYCTL_GET_KEYRING_ID, thread keyring, no create
    "bpf": ("bpf", 0, 0, 0),                                    # BPF_MAP_CREATE, no attributes
    "io_uring_setup": ("io_uring_setup", 0, 0),
    "personality": ("personality", 0x0040000),                  # ADDR_NO_RANDOMIZE: ASLR off
    "clone_newuser": ("clone", 0x10000000 | 17, 0, 0, 0, 0),    # CLONE_NEWUSER | SIGCHLD
    "clone3": ("clone3", 0, 0),
    "x32_getpid": (None, 0x40000000 | 39),                      # getpid through the x32 ABI
}
results = {}
for label, (name, *args) in calls.items():
    if name is None:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(ctypes.c_long(args[0]))
        error = ctypes.get_errno() if result == -1 else 0
    else:
        result, error = seccomp_probe.call(name, *args)
    if result == 0 and label == "clone_newuser":
        os._exit(0)  # the child of an allowed clone
    results[label] = errno.errorcode.get(error, "ok") if error else "ok"
threading.Thread(target=lambda: None).start()  # threads still start (clone3 -> ENOSYS -> clone)
results["thread"] = "ok"
results["fork"] = "ok" if os.waitpid(os.fork() or os._exit(0), 0)[1] == 0 else "failed"
results["seccomp"] = seccomp_probe.state_of_this_process()
print(json.dumps(results))
"""


def _sandboxed(
    tmp_path: Path, script: str, filtered: bool, devices: list[str] | None = None
) -> subprocess.CompletedProcess:
    settings = Settings(data_dir=tmp_path / "data")
    files = JobFiles(tmp_path / "data" / "jobs" / "probe")
    files.root.mkdir(parents=True, exist_ok=True)
    program = seccomp.program_fd()
    try:
        command = sandbox.job_command(
            settings,
            files,
            [sys.executable, "-c", script],
            seccomp_fd=program if filtered else None,
            devices=devices or [],
        )
        return subprocess.run(
            command,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(sandbox.PROJECT_ROOT)},
            cwd=files.root,
            capture_output=True,
            text=True,
            timeout=60,
            pass_fds=(program,),
        )
    finally:
        os.close(program)


def _probe(tmp_path: Path, filtered: bool) -> dict[str, str]:
    done = _sandboxed(tmp_path, PROBE, filtered)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_filter_denies_what_a_model_never_needs_and_the_same_calls_reach_the_kernel_without_it(
    tmp_path: Path,
) -> None:
    filtered = _probe(tmp_path, filtered=True)
    unfiltered = _probe(tmp_path, filtered=False)

    denied = (
        "ptrace",
        "unshare",
        "mount",
        "keyctl",
        "bpf",
        "io_uring_setup",
        "personality",
        "clone_newuser",
        "x32_getpid",
    )
    assert {name: filtered[name] for name in denied} == dict.fromkeys(denied, "EPERM")
    assert filtered["clone3"] == "ENOSYS"  # so glibc falls back to clone, whose flags the filter reads
    assert filtered["thread"] == filtered["fork"] == "ok"
    assert filtered["seccomp"] == "filtered"
    # The positive control: bubblewrap alone lets each call reach the kernel, which answers otherwise.
    assert unfiltered["ptrace"] == "ESRCH" and unfiltered["unshare"] == "ok" and unfiltered["mount"] == "EFAULT"
    assert unfiltered["keyctl"] in ("ENOKEY", "ok") and unfiltered["bpf"] == "EINVAL"
    assert unfiltered["personality"] == "ok" and unfiltered["io_uring_setup"] in ("EFAULT", "EINVAL")
    assert unfiltered["clone_newuser"] == "ENOSPC"  # bubblewrap's --disable-userns answers, not a filter
    assert unfiltered["x32_getpid"] in ("ok", "ENOSYS")  # x32 compiled in or not: never EPERM
    assert unfiltered["clone3"] == "EINVAL"
    assert unfiltered["seccomp"] == "not filtered: Seccomp mode 0"


def test_the_syscall_table_matches_the_kernel_headers() -> None:
    for header, machine in ((X86_64_HEADER, "x86_64"), (GENERIC_HEADER, "aarch64")):
        numbers = seccomp.header_numbers(header.read_text())
        assert len(numbers) > 250, header  # the parse found the table
        for name in seccomp.SYSCALLS:
            assert seccomp.number(name, machine) == numbers.get(name), (machine, name)


def test_the_program_is_well_formed_classic_bpf() -> None:
    program = seccomp.program()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096
    first = seccomp._INSTRUCTION.unpack_from(program, 0)
    assert first == (0x20, 0, 0, 4)  # it starts by loading seccomp_data.arch


NO_PRIVILEGES = {"CapEff": "0" * 16, "CapPrm": "0" * 16, "CapBnd": "0" * 16, "CapAmb": "0" * 16, "NoNewPrivs": "1"}


def test_a_job_process_without_the_filter_is_a_confinement_gap() -> None:
    facts = {"network": "isolated", "data_dir_visible": False, "processes": 2, "privileges": NO_PRIVILEGES}
    settings = Settings()

    assert sandbox.confinement_gaps({**facts, "seccomp": "filtered"}, settings) == []
    assert sandbox.confinement_gaps({**facts, "seccomp": "not filtered: Seccomp mode 0"}, settings) == [
        "the job process has no syscall filter (not filtered: Seccomp mode 0)"
    ]


def test_a_job_process_with_a_capability_or_without_no_new_privs_is_a_confinement_gap() -> None:
    facts = {"network": "isolated", "data_dir_visible": False, "processes": 2, "seccomp": "filtered"}
    settings = Settings()

    assert sandbox.confinement_gaps({**facts, "privileges": NO_PRIVILEGES}, settings) == []  # positive control
    bounding = {**NO_PRIVILEGES, "CapBnd": "0000000000200000"}  # CAP_SYS_ADMIN left in the bounding set
    assert sandbox.confinement_gaps({**facts, "privileges": bounding}, settings) == [
        "the job process holds capabilities ({'CapBnd': '0000000000200000'})"
    ]
    assert sandbox.confinement_gaps({**facts, "privileges": {**NO_PRIVILEGES, "NoNewPrivs": "0"}}, settings) == [
        "the job process can gain privileges (no_new_privs unset)"
    ]
    assert "holds capabilities (unknown)" in sandbox.confinement_gaps(facts, settings)[0]  # not reported: a gap


# ----------------------------------------------------------------------------- GPU device nodes

DEVICE_PROBE = r"""
import json, os, stat
path = "/dev/fuse"
try:
    fd = os.open(path, os.O_RDWR)
    os.close(fd)
    print(json.dumps({"char_device": stat.S_ISCHR(os.stat(path).st_mode), "opened": True}))
except OSError as error:
    print(json.dumps({"char_device": False, "opened": False, "error": error.strerror}))
"""


def test_device_nodes_named_for_the_gpu_are_bound_into_the_sandbox_and_usable(tmp_path: Path) -> None:
    """No GPU here: a real character device that bubblewrap's minimal /dev lacks (/dev/fuse) stands in
    for /dev/nvidia0; the same --dev-bind-try carries the NVIDIA nodes on a GPU host."""
    assert Path("/dev/fuse").is_char_device()  # on the host it is there
    bound = _sandboxed(tmp_path, DEVICE_PROBE, filtered=True, devices=["/dev/fuse"])
    absent = _sandboxed(tmp_path, DEVICE_PROBE, filtered=True, devices=[])

    assert json.loads(bound.stdout) == {"char_device": True, "opened": True}, bound.stderr
    assert json.loads(absent.stdout)["opened"] is False  # the positive control: not bound, not there


# ----------------------------------------------------------------------------- the worker container's profile


def test_the_compose_seccomp_profile_is_generated_and_keeps_a_filter() -> None:
    """deploy/seccomp-worker.json (no Docker here to load it: checked as data) is what the generator
    writes today, denies what the job filter denies but bubblewrap's own calls, and both compose
    files use it instead of seccomp=unconfined."""
    shipped = json.loads((sandbox.PROJECT_ROOT / "deploy" / "seccomp-worker.json").read_text())
    assert shipped == json.loads(json.dumps(seccomp.container_profile(seccomp.known_syscalls())))

    rules = {name: rule for rule in shipped["syscalls"] for name in rule["names"] if "args" not in rule}
    assert shipped["defaultAction"] == "SCMP_ACT_ERRNO"  # an allow list: calls it does not name are refused
    for name in ("mount", "umount2", "pivot_root", "unshare", "clone"):  # what bubblewrap needs
        assert rules[name]["action"] == "SCMP_ACT_ALLOW", name
    for name in (
        "ptrace",
        "keyctl",
        "bpf",
        "init_module",
        "kexec_load",
        "open_by_handle_at",
        "io_uring_setup",
        "setns",
        "perf_event_open",
        "userfaultfd",
        "process_vm_readv",
    ):
        assert (rules[name]["action"], rules[name]["errnoRet"]) == ("SCMP_ACT_ERRNO", errno.EPERM), name
    assert rules["clone3"]["errnoRet"] == errno.ENOSYS and "modify_ldt" not in rules
    assert {"read", "mmap", "futex", "execve", "openat", "socket", "epoll_wait"} <= {
        name for name, rule in rules.items() if rule["action"] == "SCMP_ACT_ALLOW"
    }
    for compose in ("docker-compose.yml", "docker-compose.worker.yml"):
        text = (sandbox.PROJECT_ROOT / compose).read_text()
        assert "seccomp=./deploy/seccomp-worker.json" in text and "seccomp=unconfined" not in text, compose
