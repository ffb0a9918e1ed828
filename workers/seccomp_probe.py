"""The job's syscall filter seen from inside: whether this process runs under the filter of
``workers.seccomp`` (``state_of_this_process``, reported by the job's confinement check), and a raw
syscall by name (``call``) to try what the filter should refuse.
"""

from __future__ import annotations

import ctypes
import errno

from workers.seccomp import number


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
