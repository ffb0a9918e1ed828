"""bubblewrap's sandbox, built by this process itself from bubblewrap's own command line.

Used by the fork server (``workers.fork_sandbox``): a process forked from one that imported torch
cannot exec bubblewrap without losing that import, so it carries out what bubblewrap would for the
same command (``sandbox.job_command``), option by option (``Plan``): its own user and PID namespaces
(``enter_user_and_pid_namespaces``, in the parent of the job's process), then in the job's process,
PID 1 of the new namespace, ``confine``: mount, network, IPC, UTS and cgroup namespaces, a tmpfs root
with the command's mounts, ``pivot_root``, one nested user namespace and no more (``--disable-userns``),
every capability dropped, ``no_new_privs`` and the syscall filter. Linux on x86_64 and aarch64.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import platform
import socket
import struct
import sys
from pathlib import Path
from typing import Any

# <linux/sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/capability.h>
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 22, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER = 4, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYSCALLS = {"pivot_root": {"x86_64": 155, "aarch64": 41}, "mount_setattr": {"x86_64": 442, "aarch64": 442}}
# What bubblewrap's --dev binds from the host, and links; /proc paths it covers read-only.
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "fd": "/proc/self/fd",
    "core": "/proc/kcore",
    "ptmx": "pts/ptmx",
}
_BINDS = ("--ro-bind", "--ro-bind-try", "--bind", "--dev-bind-try")
_SIOCSIFFLAGS, _IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40  # <linux/sockios.h>, <net/if.h>
_PROC_COVERED = ("sys", "sysrq-trigger", "irq", "bus")
# Options that take no value, and must all be there: the fork does all of these. Written out here, not
# taken from sandbox.job_command's list: this is what the fork implements, so an option added there is
# refused here (and warm processes go back to bubblewrap) until it is implemented here too.
_FLAGS = {
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-net",
    "--unshare-uts",
    "--unshare-cgroup-try",
    "--disable-userns",
    "--die-with-parent",
}
_ARITY = {
    "--uid": 1,
    "--gid": 1,
    "--cap-drop": 1,
    "--seccomp": 1,
    "--hostname": 1,
    "--proc": 1,
    "--dev": 1,
    "--size": 1,
    "--tmpfs": 1,
    "--chdir": 1,
    "--symlink": 2,
    "--ro-bind": 2,
    "--ro-bind-try": 2,
    "--bind": 2,
    "--dev-bind-try": 2,
}
# The monitor that ``A`` becomes: waits for ``B``, reports its status as bubblewrap's exit status would
# be, and keeps its PID (the process group the supervisor signals) until the worker has read it.


class SetupError(Exception):
    """The sandbox could not be built as its command says."""


class Plan:
    """The sandbox a bubblewrap command line describes: its ids, hostname, mounts in order, and command."""

    def __init__(self) -> None:
        self.uid = self.gid = 65534
        self.hostname = "sandbox"
        self.chdir = "/"
        self.mounts: list[tuple[str, ...]] = []
        self.command: list[str] = []

    @classmethod
    def parse(cls, argv: list[str]) -> Plan:
        if not isinstance(argv, list) or not all(isinstance(word, str) for word in argv):
            raise SetupError("the command is not a list of strings")
        plan, seen, size = cls(), set(), None
        index = 1  # argv[0]: bubblewrap's path
        while index < len(argv) and argv[index] != "--":
            option = argv[index]
            if option in _FLAGS:
                seen.add(option)
                index += 1
                continue
            if option not in _ARITY:
                raise SetupError(f"unknown option {option}")
            values = argv[index + 1 : index + 1 + _ARITY[option]]
            if len(values) != _ARITY[option]:
                raise SetupError(f"{option} lacks its value")
            index += 1 + _ARITY[option]
            if option in ("--uid", "--gid"):
                setattr(plan, option[2:], int(values[0]))
            elif option == "--cap-drop":
                if values[0] != "ALL":
                    raise SetupError("only --cap-drop ALL")
            elif option == "--hostname":
                plan.hostname = values[0]
            elif option == "--chdir":
                plan.chdir = values[0]
            elif option == "--size":
                if argv[index : index + 1] != ["--tmpfs"]:
                    raise SetupError("--size must be followed by --tmpfs")
                size = int(values[0])
            elif option == "--seccomp":
                seen.add(option)
            else:
                for path in values[-1:] if option == "--symlink" else values:
                    if not path.startswith("/") or "/../" in f"{path}/":
                        raise SetupError(f"{option}: not absolute: {path}")
                if option in _BINDS:  # resolved on the host, as bubblewrap does, before any namespace
                    values = [os.path.realpath(values[0]), values[1]]
                if option == "--tmpfs":
                    values, size = [str(size or 0), values[0]], None  # the path last, as in every mount
                plan.mounts.append((option, *values))
        missing = (_FLAGS | {"--seccomp"}) - seen
        if missing:
            raise SetupError(f"the command lacks {', '.join(sorted(missing))}")
        plan.command = argv[index + 1 :]
        if plan.command[:1] != [sys.executable]:
            raise SetupError("a fork runs only this interpreter (the fork server's)")
        if plan.command[1:4] != ["-m", "workers.job_process", "--warm"] or len(plan.command) != 5:
            raise SetupError("a fork runs only a waiting job process")
        return plan


def enter_user_and_pid_namespaces(plan: Plan) -> None:
    """New user and PID namespaces (the next child is PID 1 of the latter), this uid mapped to the plan's."""
    uid, gid = os.getuid(), os.getgid()
    libc_call("unshare", CLONE_NEWUSER | CLONE_NEWPID)
    _map_ids(plan, uid, gid)


def confine(plan: Plan, seccomp_fd: int) -> None:
    """In PID 1 of the plan's PID namespace: build the rest of the sandbox and give up every way out of it."""
    with contextlib.suppress(OSError):  # as bubblewrap's --unshare-cgroup-try
        libc_call("unshare", CLONE_NEWCGROUP)
    libc_call("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    _loopback_up()
    name = plan.hostname.encode()
    libc_call("sethostname", name, len(name))
    last_capability = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    # --disable-userns, as bubblewrap does it: this user namespace may hold one more, which is entered
    # last; from in there none can be made (the syscall filter refuses them too).
    Path("/proc/sys/user/max_user_namespaces").write_text("1")
    _build_root(plan)
    libc_call("unshare", CLONE_NEWUSER)
    _map_ids(plan, plan.uid, plan.gid)
    _drop_privileges(last_capability, seccomp_fd)


def _loopback_up() -> None:
    """``lo`` up in the new network namespace, as bubblewrap brings it up (SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as handle:
        request = struct.pack("16sH14x", b"lo", _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING)
        fcntl.ioctl(handle.fileno(), _SIOCSIFFLAGS, request)


def _map_ids(plan: Plan, uid: int, gid: int) -> None:
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{plan.uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{plan.gid} {gid} 1")


def _build_root(plan: Plan) -> None:
    """As bubblewrap does: a tmpfs as the root, the old root kept at /oldroot while the mounts are made
    under /newroot from it, then /newroot made the root and the host's tree detached."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NODEV | MS_NOSUID, "mode=0755")
    os.mkdir("/tmp/newroot", 0o755)
    os.mkdir("/tmp/oldroot", 0o755)
    _syscall("pivot_root", b"/tmp", b"/tmp/oldroot")
    os.chdir("/")
    _mount("/newroot", "/newroot", None, MS_BIND | MS_REC)  # a mount point, for the last pivot
    for operation, *values in plan.mounts:
        _apply(operation, values)
    libc_call("umount2", b"/oldroot", MNT_DETACH)
    os.chdir("/newroot")
    _syscall("pivot_root", b".", b".")
    libc_call("umount2", b".", MNT_DETACH)
    os.chdir(plan.chdir)


def _apply(operation: str, values: list[str]) -> None:
    if operation == "--symlink":
        target, path = values
        _parents(_inside(path))
        os.symlink(target, _inside(path))
        return
    destination = _inside(values[-1])
    if operation == "--proc":
        _directory(destination)
        _mount("proc", destination, "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV)
        for name in _PROC_COVERED:
            covered = f"{destination}/{name}"
            if os.path.exists(covered):
                _bind(covered, covered, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    elif operation == "--dev":
        _directory(destination)
        _mount("tmpfs", destination, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        for node in _DEV_NODES:
            open(f"{destination}/{node}", "w").close()
            _bind(f"/oldroot/dev/{node}", f"{destination}/{node}", MOUNT_ATTR_NOSUID)
        for name, target in _DEV_LINKS.items():
            os.symlink(target, f"{destination}/{name}")
        os.mkdir(f"{destination}/shm", 0o1777)
        os.mkdir(f"{destination}/pts", 0o755)
        _mount("devpts", f"{destination}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    elif operation == "--tmpfs":
        _directory(destination)
        size = int(values[0])
        _mount("tmpfs", destination, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755" + (f",size={size}" if size else ""))
    else:
        source = "/oldroot" + os.path.abspath(values[0])
        if operation.endswith("-try") and not os.path.exists(source):
            return
        if os.path.isdir(source):
            _directory(destination)
        else:
            _parents(destination)
            if not os.path.exists(destination):
                open(destination, "w").close()
        attributes = {
            "--ro-bind": MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            "--ro-bind-try": MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            "--bind": MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            "--dev-bind-try": MOUNT_ATTR_NOSUID,
        }[operation]
        _bind(source, destination, attributes)


def _inside(path: str) -> str:
    return "/newroot" + path.rstrip("/")  # absolute, no "..": checked by Plan.parse


def _directory(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _parents(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)


def _bind(source: str, destination: str, attributes: int) -> None:
    _mount(source, destination, None, MS_BIND | MS_REC)
    attr = (ctypes.c_uint64 * 4)(attributes, 0, 0, 0)  # struct mount_attr: set, clear, propagation, userns
    _syscall("mount_setattr", AT_FDCWD, destination.encode(), AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))


def _drop_privileges(last_capability: int, seccomp_fd: int) -> None:
    """No capability left in any set, no way to gain one, then the syscall filter (as ``bwrap --seccomp``)."""
    for capability in range(last_capability + 1):
        libc_call("prctl", PR_CAPBSET_DROP, capability, 0, 0, 0)
    libc_call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    libc_call("capset", ctypes.byref(header), ctypes.byref(data))
    libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    program = b""
    while chunk := os.read(seccomp_fd, 1 << 16):
        program += chunk
    os.close(seccomp_fd)
    if not program or len(program) % 8:
        raise SetupError("the syscall filter is empty or malformed")
    buffer = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    libc_call("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)


_libc = ctypes.CDLL(None, use_errno=True)


def libc_call(name: str, *arguments: Any) -> int:
    converted = [ctypes.c_ulong(a) if isinstance(a, int) and a >= 0 else a for a in arguments]
    result = getattr(_libc, name)(*converted)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")
    return result


def _syscall(name: str, *arguments: Any) -> int:
    number = _SYSCALLS[name].get(platform.machine())
    if number is None:
        raise SetupError(f"{name} is not known on {platform.machine()}")
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in arguments]
    result = _libc.syscall(ctypes.c_long(number), *converted)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")
    return result


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encoded = [None if value is None else value.encode() for value in (source, target, fstype, data)]
    result = _libc.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3])
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype or 'bind'} on {target.removeprefix('/newroot')}: {os.strerror(errno)}")
