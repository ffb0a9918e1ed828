"""Checks of an uploaded TorchScript archive that read only its zip directory (no torch, no unpickling).

The API runs them before a job is queued, so a file that cannot be a TorchScript model - or
that would expand far beyond its size - is refused at once with a reason. Reading the central
directory costs memory in proportion to the number of entries, which is bounded first.
"""
from __future__ import annotations

import posixpath
import struct
import zipfile
from pathlib import Path

from modelpress.formats import exported_program_problem, is_exported_program

EXPORT_HINT = "export the model with torch.jit.script(model).save('model.pt')"
MAX_ENTRIES = 20_000
MAX_COMPRESSION_RATIO = 50  # torch.jit.save stores entries uncompressed; deflate bombs reach 1000x
RATIO_CHECK_MIN_BYTES = 1 << 20
REQUIRED = ("data.pkl", "constants.pkl", "version")


class ArchiveRejected(ValueError):
    """The file is not an acceptable TorchScript archive; ``str()`` says why and how to fix it."""


def check_torchscript_archive(path: Path, max_uncompressed_bytes: int) -> None:
    if not zipfile.is_zipfile(path):
        raise ArchiveRejected(
            "not a TorchScript archive: no zip directory found, so the file is truncated or not a "
            f"TorchScript model (a pickle, for instance, is refused unread); {EXPORT_HINT}"
        )
    declared = _declared_entry_count(path)
    if declared is None or declared > MAX_ENTRIES:
        raise ArchiveRejected(f"the archive declares {declared if declared is not None else 'an unreadable number of'} "
                              f"entries; at most {MAX_ENTRIES} are accepted")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = _bounded_entries(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ArchiveRejected(f"the zip archive is damaged ({error}); upload the complete file again") from None
    total = 0
    for entry in entries:
        name = entry.filename
        if name.startswith("/") or "\\" in name or ".." in posixpath.normpath(name).split("/"):
            raise ArchiveRejected(f"the archive holds an unsafe path {name[:100]!r}")
        total += entry.file_size
        if (entry.file_size > RATIO_CHECK_MIN_BYTES and entry.compress_size > 0
                and entry.file_size / entry.compress_size > MAX_COMPRESSION_RATIO):
            raise ArchiveRejected(f"entry {name[:100]!r} expands {entry.file_size // entry.compress_size}x: "
                                  "refused as a zip bomb (TorchScript stores tensors uncompressed)")
    if total > max_uncompressed_bytes:
        raise ArchiveRejected(f"the archive declares {total} bytes uncompressed, more than the "
                              f"{max_uncompressed_bytes} accepted")
    names = [entry.filename for entry in entries]
    if is_exported_program(names):  # a torch.export .pt2: its own layout and pickle checks
        if (problem := exported_program_problem(path, names)) is not None:
            raise ArchiveRejected(problem)
        return
    roots = {name.split("/", 1)[0] for name in names}
    root = next(iter(roots)) if len(roots) == 1 else None
    if root is None or not all(f"{root}/{required}" in names for required in REQUIRED) \
            or not any(name.startswith(f"{root}/code/") for name in names):
        raise ArchiveRejected(
            "the file is a zip archive but not TorchScript (it needs one folder with data.pkl, "
            f"constants.pkl, version and code/): probably a torch.save() checkpoint or state_dict; {EXPORT_HINT}"
        )


def _declared_entry_count(path: Path) -> int | None:
    """Entry count from the end-of-central-directory record, read before the directory itself is parsed."""
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - (1 << 16) - 22))
        tail = handle.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) < end + 22:
        return None
    count = struct.unpack("<H", tail[end + 10:end + 12])[0]
    if count != 0xFFFF:
        return count
    zip64 = tail.rfind(b"PK\x06\x06", 0, end)
    if zip64 < 0 or len(tail) < zip64 + 40:
        return None
    return struct.unpack("<Q", tail[zip64 + 32:zip64 + 40])[0]


def _bounded_entries(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    entries = archive.infolist()
    if len(entries) > MAX_ENTRIES:
        raise ArchiveRejected(f"the archive has {len(entries)} entries; at most {MAX_ENTRIES} are accepted")
    return entries
