"""The job process's syscall filter: a classic-BPF seccomp program, built here in pure Python.

bubblewrap (``--seccomp FD``) reads the compiled program from a file descriptor and installs it
just before it runs the job's command, after its own namespace set-up. The filter denies, with
``EPERM``, what a model never needs and what the kernel's attack surface is made of: tracing and
reading other processes, mounts and namespaces, kernel modules, keyrings, BPF, perf, io_uring,
the clock, swap and reboot. ``clone3`` gets ``ENOSYS``, because its flags sit in memory a filter
cannot read: glibc then falls back to ``clone``, whose flags argument is checked (threads and
plain forks pass; a new namespace does not). Everything else torch uses (threads, OpenMP, mmap,
g++ for inductor and AOTInductor compiles) is allowed: this is a deny list, like Docker's default.

Only the native 64-bit ABI of x86_64 and aarch64 is allowed; a call through another ABI
(i386's ``int 0x80``, x32's numbers) kills the process or fails, since no model needs one.

The syscall numbers are a table here (from the kernel's headers: ``asm/unistd_64.h`` for
x86_64 and ``asm-generic/unistd.h`` for aarch64), checked against the headers where they are
installed (tests/security/test_syscall_filter.py). No libseccomp: one dependency less, and the whole
program is about 140 instructions one can read in ``program()``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import struct
from dataclasses import dataclass

# ----------------------------------------------------------------------------- the kernel's ABI

# <linux/audit.h>: EM_X86_64 / EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000  # x86_64 numbers with this bit set are the x32 ABI

# <linux/seccomp.h>: return values (the low 16 bits of SECCOMP_RET_ERRNO carry the errno)
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
_NR_OFFSET, _ARCH_OFFSET, _ARGS_OFFSET = 0, 4, 16  # args[i]'s low 32 bits on a little-endian machine

# <linux/bpf_common.h>: the classic-BPF instructions a filter needs
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K, _JGE_K, _JSET_K = 0x05 | 0x10, 0x05 | 0x30, 0x05 | 0x40  # BPF_JMP | BPF_JEQ/JGE/JSET | BPF_K
_RET_K = 0x06
_INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }

# <linux/sched.h>: clone flags that make a new namespace. In clone(2) the kernel reads only the low
# 32 bits of flags (lower_32_bits(clone_flags)), so checking the low word is enough.
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)

# personality(2) values that are allowed: Linux (0), the query (0xffffffff) and the 32-bit and
# uname-26 variants that Docker's default profile also allows. ADDR_NO_RANDOMIZE (turning off
# ASLR) and READ_IMPLIES_EXEC are not among them.
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# ----------------------------------------------------------------------------- what is denied

DENIED = (
    # other processes' memory and state
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "process_madvise",
    # mounts and namespaces (bubblewrap has set them up; the job makes none)
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    # the kernel's larger attack surfaces
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    # the machine itself
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "lookup_dcookie",
    "fanotify_init",
    "open_by_handle_at",
    "name_to_handle_at",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "clock_adjtime",
)
# Checked by argument or answered otherwise (see program()).
ARGUMENT_CHECKED = ("clone", "clone3", "personality")

# Syscall numbers, from /usr/include/x86_64-linux-gnu/asm/unistd_64.h and
# /usr/include/asm-generic/unistd.h (aarch64 uses the generic table). None: no such call there.
SYSCALLS: dict[str, tuple[int | None, int | None]] = {  # name: (x86_64, aarch64)
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "kcmp": (312, 272),
    "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "move_mount": (429, 429),
    "open_tree": (428, 428),
    "fsopen": (430, 430),
    "fsmount": (432, 432),
    "fsconfig": (431, 431),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "syslog": (103, 116),
    "lookup_dcookie": (212, 18),
    "fanotify_init": (300, 262),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "iopl": (172, None),
    "ioperm": (173, None),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "adjtimex": (159, 171),
    "clock_adjtime": (305, 266),
    "clone": (56, 220),
    "clone3": (435, 435),
    "personality": (135, 92),
}


@dataclass(frozen=True)
class Architecture:
    name: str
    audit_arch: int
    column: int  # in SYSCALLS
    has_x32: bool


ARCHITECTURES = (
    Architecture("x86_64", AUDIT_ARCH_X86_64, 0, True),
    Architecture("aarch64", AUDIT_ARCH_AARCH64, 1, False),
)


def number(name: str, machine: str | None = None) -> int | None:
    """The syscall number of ``name`` on ``machine`` (this one by default); None where it has none."""
    machine = machine or platform.machine()
    for arch in ARCHITECTURES:
        if arch.name == machine:
            return SYSCALLS[name][arch.column]
    raise UnsupportedMachine(machine)


class UnsupportedMachine(RuntimeError):
    """The filter knows x86_64 and aarch64 only."""


def header_numbers(header: str) -> dict[str, int]:
    """``{name: number}`` from a kernel ``unistd`` header's ``#define __NR_<name> <number>`` lines."""
    return {name: int(nr) for name, nr in re.findall(r"^#define __NR_(\w+)\s+(\d+)\s*$", header, re.MULTILINE)}


# ----------------------------------------------------------------------------- the program


def program() -> bytes:
    """The compiled filter: a ``struct sock_filter`` array, as bubblewrap's ``--seccomp`` reads it."""
    code = _Assembler()
    code.load(_ARCH_OFFSET)
    for arch in ARCHITECTURES:
        code.jump_if(_JEQ_K, arch.audit_arch, arch.name)
    code.ret(RET_KILL_PROCESS)  # any other ABI (i386 through int 0x80 on x86_64, arm32 compat...)
    for arch in ARCHITECTURES:
        _architecture_section(code, arch)
    return code.assemble()


def _architecture_section(code: _Assembler, arch: Architecture) -> None:
    own = arch.name
    code.label(own)
    code.load(_NR_OFFSET)
    if arch.has_x32:
        code.jump_if(_JGE_K, X32_SYSCALL_BIT, f"{own}:deny")
    for name in DENIED:
        nr = SYSCALLS[name][arch.column]
        if nr is not None:
            code.jump_if(_JEQ_K, nr, f"{own}:deny")
    code.jump_if(_JEQ_K, SYSCALLS["clone"][arch.column], f"{own}:clone")
    code.jump_if(_JEQ_K, SYSCALLS["clone3"][arch.column], f"{own}:enosys")
    code.jump_if(_JEQ_K, SYSCALLS["personality"][arch.column], f"{own}:personality")
    code.ret(RET_ALLOW)

    code.label(f"{own}:clone")  # a thread or a fork passes; a new namespace does not
    code.load(_ARGS_OFFSET)
    code.jump_if(_JSET_K, NAMESPACE_FLAGS, f"{own}:deny")
    code.ret(RET_ALLOW)

    code.label(f"{own}:personality")
    code.load(_ARGS_OFFSET)
    for value in ALLOWED_PERSONALITIES:
        code.jump_if(_JEQ_K, value, f"{own}:personality-allowed")
    code.label(f"{own}:deny")
    code.ret(RET_ERRNO | errno.EPERM)
    code.label(f"{own}:enosys")
    code.ret(RET_ERRNO | errno.ENOSYS)
    code.label(f"{own}:personality-allowed")  # classic BPF jumps forward only: a second "allow"
    code.ret(RET_ALLOW)


class _Assembler:
    """Classic BPF with forward jumps to labels; a conditional jump falls through when false."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | None, int]] = []  # (opcode, label to jump to when true, k)
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, None, offset))

    def jump_if(self, opcode: int, k: int, label: str) -> None:
        self._code.append((opcode, label, k))

    def ret(self, value: int) -> None:
        self._code.append((_RET_K, None, value))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name} defined twice")
        self._labels[name] = len(self._code)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (opcode, label, k) in enumerate(self._code):
            jt = 0
            if label is not None:
                jt = self._labels[label] - index - 1
                if not 0 <= jt <= 255:  # classic BPF jumps forward only, at most 255 instructions
                    raise ValueError(f"jump to {label} out of reach ({jt})")
            out += _INSTRUCTION.pack(opcode, jt, 0, k)
        if len(self._code) > 4096:  # BPF_MAXINSNS
            raise ValueError(f"the filter has {len(self._code)} instructions, over the kernel's 4096")
        return bytes(out)


def program_fd() -> int:
    """A pipe's read end holding the program (the write end closed), for ``bwrap --seccomp FD``.

    The program (~2 KB) fits in a pipe's buffer, so the write never blocks; the caller passes the
    descriptor to bubblewrap and closes its own copy once bubblewrap has started.
    """
    data = program()
    read_fd, write_fd = os.pipe()
    try:
        if len(data) > 65536:
            raise ValueError("the seccomp program does not fit in a pipe")
        os.write(write_fd, data)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


# ----------------------------------------------------------------------------- the worker container's profile

# What bubblewrap itself calls to build the sandbox (bubblewrap.c: raw clone with CLONE_NEW* flags,
# unshare(CLONE_NEWUSER) for --disable-userns, mount, pivot_root, umount2). Docker's default profile
# refuses these to a container without CAP_SYS_ADMIN, so the worker's container allows them, and
# the job's own filter (above) takes them away again before any model code runs.
BWRAP_NEEDS = ("clone", "unshare", "mount", "umount2", "pivot_root")
# Left out of the container's allow list besides DENIED, as Docker's default leaves them out: obsolete
# or unimplemented calls, x86's LDT, moving another process's pages; and the headers' count "syscalls".
CONTAINER_OMITS = (
    "uselib",
    "_sysctl",
    "ustat",
    "sysfs",
    "vhangup",
    "nfsservctl",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "afs_syscall",
    "tuxcall",
    "security",
    "vserver",
    "putpmsg",
    "getpmsg",
    "modify_ldt",
    "migrate_pages",
    "move_pages",
    "syscalls",
)


def container_profile(known_syscalls: set[str]) -> dict:
    """A Docker / OCI seccomp profile for the worker's container: every ``known_syscalls`` name allowed
    but what the job filter denies (bubblewrap's namespace and mount calls excepted), the obsolete ones
    and ``clone3``; calls it does not know (newer kernels') get ENOSYS, so libc falls back to older ones.

    ``known_syscalls``: the names in the kernel headers (``header_numbers`` of x86_64's and the generic table).
    """
    denied = set(DENIED) - set(BWRAP_NEEDS)
    denied |= {twin for name in denied for twin in (f"{name}64", f"{name}_time64")} & known_syscalls  # 32-bit twins
    handled = denied | set(CONTAINER_OMITS) | {"clone3", "personality"}
    allowed = sorted(name for name in known_syscalls if name not in handled and not name.startswith("arch_specific"))
    return {
        "comment": "Generated by `python -m workers.seccomp > deploy/seccomp-worker.json` from the kernel headers; "
        "see docs/security.md. Do not edit by hand.",
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.ENOSYS,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []},
        ],
        "syscalls": [
            {"names": allowed, "action": "SCMP_ACT_ALLOW"},
            {
                "names": sorted(denied),
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "comment": "what a model never needs (workers/seccomp.py DENIED) but bubblewrap's own calls",
            },
            {
                "names": ["clone3"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.ENOSYS,
                "comment": "flags a filter cannot read: glibc falls back to clone",
            },
            *(
                {
                    "names": ["personality"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}],
                }
                for value in ALLOWED_PERSONALITIES
            ),
        ],
    }


def known_syscalls(
    headers: tuple[str, ...] = ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm-generic/unistd.h"),
) -> set[str]:
    names: set[str] = set()
    for header in headers:
        with open(header) as handle:
            names.update(header_numbers(handle.read()))
    return names


# ----------------------------------------------------------------------------- seen from inside


def state_of_this_process() -> str:
    """``filtered`` when this process runs under a syscall filter that denies what ``DENIED`` names.

    ``/proc/self/status`` says whether some filter is installed (``Seccomp: 2``); whose filter it is
    (a container's may be there too) is shown by trying two harmless calls this filter refuses:
    ``unshare(0)`` (which changes nothing) and ``keyctl(KEYCTL_GET_KEYRING_ID, thread keyring, no
    create)`` (which reads nothing). Both must fail with EPERM.
    """
    try:
        with open("/proc/self/status") as status:
            mode = next((line.split(":", 1)[1].strip() for line in status if line.startswith("Seccomp:")), "?")
    except OSError as error:
        return f"unknown: /proc/self/status unreadable ({error.strerror})"
    if mode != "2":
        return f"not filtered: Seccomp mode {mode}"
    for name, args in (("unshare", (0,)), ("keyctl", (0, -1, 0))):  # KEYCTL_GET_KEYRING_ID, KEY_SPEC_THREAD_KEYRING
        result, error = call(name, *args)
        if error != errno.EPERM:
            return f"not filtered: {name} returned {result} ({errno.errorcode.get(error, error) if error else 'ok'})"
    return "filtered"


def call(name: str, *args: int) -> tuple[int, int]:
    """Make syscall ``name`` directly (no libc wrapper in between); returns (result, errno or 0)."""
    nr = number(name)
    if nr is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(arg) for arg in args))
    return result, ctypes.get_errno() if result == -1 else 0


if __name__ == "__main__":
    import json
    import sys

    json.dump(container_profile(known_syscalls()), sys.stdout, indent=1)
    sys.stdout.write("\n")
