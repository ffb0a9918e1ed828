"""Checks of an uploaded TorchScript archive that read only its zip directory and code (no torch, no unpickling).

The API runs them before a job is queued, so a file that cannot be a TorchScript model, that would
expand far beyond its size, or whose code calls file or foreign operators is refused at once with
a reason. The zip directory is read by this module, not by ``zipfile``: ``zipfile`` parses the
whole central directory whatever the end record declares, so an archive that lies about its entry
count costs memory in proportion to its size. Here the directory is bounded by the size and offset
the end record declares, checked against the file, and parsing stops at the entry limit.

What is accepted is what ``torch.jit.load`` accepts (caffe2/serialize/inline_container.cc): the
archive's root folder is the folder of its first entry; the version record is ``<root>/.data/version``
(written when an op carries a newer dynamic format version) or ``<root>/version``; TorchScript then
reads ``<root>/data.pkl``, ``<root>/constants.pkl`` and compiles ``<root>/code/``.

The same bounds (``bounded_entries``) come first for every uploaded zip, the ``.npz`` data file included.

A ``torch.export.save`` archive (``.pt2``) is told apart by its layout, after the same bounds, and
checked by ``modelpress.formats`` (layout allow-list, no pickles, allowed operators only).
"""

from __future__ import annotations

import posixpath
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from modelpress.formats import exported_program_problem, is_exported_program
from modelpress.operator_policy import scan_source, unsafe_detail

EXPORT_HINT = "export the model with torch.jit.script(model).save('model.pt')"
MAX_ENTRIES = 20_000
MAX_DIRECTORY_BYTES = 8 << 20  # torch writes ~100 bytes an entry: 20,000 entries fit in 2 MB
# All of code/*.py: a large transformer's code is a few hundred KB (scripted resnet152: 60 KB). The
# API tokenizes code that names a suspect operator at about 0.3 MB/s, so this also bounds that work.
MAX_CODE_BYTES = 8 << 20
MAX_COMPRESSION_RATIO = 50  # torch.jit.save stores entries uncompressed; deflate bombs reach 1000x
RATIO_CHECK_MIN_BYTES = 1 << 20
VERSION_RECORDS = (".data/version", "version")
REQUIRED = ("data.pkl", "constants.pkl")

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_ENTRY = struct.Struct("<4s6H3L5H2L")  # central directory file header


class ArchiveRejected(ValueError):
    """The file is not an acceptable TorchScript archive; ``str()`` says why and how to fix it."""


@dataclass(frozen=True)
class Entry:
    name: str
    compressed: int
    size: int


def check_torchscript_archive(path: Path, max_uncompressed_bytes: int, check_ops: bool = True) -> None:
    entries = bounded_entries(path, max_uncompressed_bytes, "TorchScript stores tensors uncompressed")
    names = [entry.name for entry in entries]
    if is_exported_program(names):  # a torch.export .pt2: its own layout, pickle and operator checks
        if (problem := exported_program_problem(path, names, check_ops)) is not None:
            raise ArchiveRejected(problem)
        return
    root = _torchscript_root(entries)
    if check_ops:
        _check_code(path, root, entries)


def bounded_entries(path: Path, max_uncompressed_bytes: int, stored_hint: str) -> list[Entry]:
    """The entries of an uploaded zip (a model, a student, an ``.npz`` data file), once its directory
    and what the entries declare are within bounds; only then may ``zipfile`` or ``np.load`` open it.

    Bounds: the directory (``read_directory``), safe names, no entry expanding more than
    ``MAX_COMPRESSION_RATIO`` times (``stored_hint`` says how a genuine file stores its entries),
    at most ``max_uncompressed_bytes`` declared in all.
    """
    entries = read_directory(path)
    total = 0
    for entry in entries:
        name = entry.name
        if name.startswith("/") or "\\" in name or ".." in posixpath.normpath(name).split("/"):
            raise ArchiveRejected(f"the archive holds an unsafe path {name[:100]!r}")
        total += entry.size
        if (
            entry.size > RATIO_CHECK_MIN_BYTES
            and entry.compressed > 0
            and entry.size / entry.compressed > MAX_COMPRESSION_RATIO
        ):
            raise ArchiveRejected(
                f"entry {name[:100]!r} expands {entry.size // entry.compressed}x: refused as a zip bomb ({stored_hint})"
            )
    if total > max_uncompressed_bytes:
        raise ArchiveRejected(
            f"the archive declares {total} bytes uncompressed, more than the {max_uncompressed_bytes} accepted"
        )
    return entries


def read_directory(path: Path) -> list[Entry]:
    """The archive's entries, read from a central directory bounded by its end record."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        tail_start = max(0, size - (1 << 16) - _END.size)
        handle.seek(tail_start)
        tail = handle.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) < end + _END.size:
            raise ArchiveRejected(
                "not a TorchScript archive: no zip directory found, so the file is truncated or not a "
                f"TorchScript model (a pickle, for instance, is refused unread); {EXPORT_HINT}"
            )
        _, disk, _, _, declared, directory_size, directory_offset, _ = _END.unpack_from(tail, end)
        end_at = tail_start + end
        if (
            end >= _END64_LOCATOR.size
            and tail[end - _END64_LOCATOR.size : end - _END64_LOCATOR.size + 4] == b"PK\x06\x07"
        ):
            # torch always writes the zip64 records; the directory then ends where they start.
            declared64, size64, end_at = _zip64_end(handle, tail, end, tail_start)
            declared = declared64 if declared == 0xFFFF else declared
            directory_size = size64 if directory_size == 0xFFFFFFFF else directory_size
        elif 0xFFFF == declared or 0xFFFFFFFF in (directory_size, directory_offset):
            raise ArchiveRejected("the zip archive is damaged (its zip64 end record is missing)")
        if disk not in (0, 0xFFFF):
            raise ArchiveRejected("the archive spans several disks; upload a single-file TorchScript archive")
        if declared > MAX_ENTRIES:
            raise ArchiveRejected(f"the archive declares {declared} entries; at most {MAX_ENTRIES} are accepted")
        # The directory ends where the end record starts (files with data prepended, as zipfile allows).
        start = end_at - directory_size
        if directory_size > MAX_DIRECTORY_BYTES or start < 0:
            raise ArchiveRejected(
                f"the archive's directory declares {directory_size} bytes, more than the file "
                f"holds or the {MAX_DIRECTORY_BYTES} accepted"
            )
        handle.seek(start)
        directory = handle.read(directory_size)
    entries = _parse_directory(directory)
    if len(entries) != declared:
        raise ArchiveRejected(
            f"the zip archive is damaged: its end record declares {declared} entries, its "
            f"directory holds {len(entries)}; upload the complete file again"
        )
    return entries


def _zip64_end(handle, tail: bytes, end: int, tail_start: int) -> tuple[int, int, int]:
    locator = end - _END64_LOCATOR.size
    if locator < 0 or tail[locator : locator + 4] != b"PK\x06\x07":
        raise ArchiveRejected("the zip archive is damaged (its zip64 end record is missing)")
    record_at = _END64_LOCATOR.unpack_from(tail, locator)[2]
    # The zip64 end record sits right before its locator; use that position, not the declared one.
    record_pos = tail_start + locator - _END64.size
    if record_pos < 0:
        raise ArchiveRejected("the zip archive is damaged (its zip64 end record is missing)")
    handle.seek(record_pos)
    record = handle.read(_END64.size)
    if len(record) != _END64.size or record[:4] != b"PK\x06\x06" or record_at > record_pos:
        raise ArchiveRejected("the zip archive is damaged (its zip64 end record is missing)")
    fields = _END64.unpack(record)
    return fields[7], fields[8], record_pos


def _parse_directory(directory: bytes) -> list[Entry]:
    entries: list[Entry] = []
    offset = 0
    while offset < len(directory):
        if len(entries) >= MAX_ENTRIES:
            raise ArchiveRejected(
                f"the archive has more than {MAX_ENTRIES} entries; at most {MAX_ENTRIES} are accepted"
            )
        if len(directory) < offset + _ENTRY.size or directory[offset : offset + 4] != b"PK\x01\x02":
            raise ArchiveRejected("the zip archive is damaged (bad central directory); upload the complete file again")
        fields = _ENTRY.unpack_from(directory, offset)
        compressed, size = fields[8], fields[9]
        name_length, extra_length, comment_length = fields[10], fields[11], fields[12]
        name_start = offset + _ENTRY.size
        extra_start = name_start + name_length
        offset = extra_start + extra_length + comment_length
        if offset > len(directory):
            raise ArchiveRejected("the zip archive is damaged (bad central directory); upload the complete file again")
        name = directory[name_start:extra_start].decode("utf-8", errors="replace")
        if 0xFFFFFFFF in (compressed, size):
            size, compressed = _zip64_sizes(directory[extra_start : extra_start + extra_length], size, compressed)
        entries.append(Entry(name, compressed, size))
    return entries


def _zip64_sizes(extra: bytes, size: int, compressed: int) -> tuple[int, int]:
    """Sizes from the zip64 extra field (id 1): the 64-bit values of the fields set to 0xFFFFFFFF, in order."""
    position = 0
    while position + 4 <= len(extra):
        kind, length = struct.unpack_from("<2H", extra, position)
        body = extra[position + 4 : position + 4 + length]
        if kind == 1:
            values = [struct.unpack_from("<Q", body, index)[0] for index in range(0, len(body) - 7, 8)]
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                compressed = values.pop(0)
            return size, compressed
        position += 4 + length
    raise ArchiveRejected("the zip archive is damaged (zip64 sizes missing); upload the complete file again")


def _torchscript_root(entries: list[Entry]) -> str:
    """The root folder, as torch finds it (the first entry's folder), once it holds a TorchScript model."""
    first = entries[0].name if entries else ""
    names = {entry.name for entry in entries}
    root = first.split("/", 1)[0] if "/" in first else None
    if root and f"{root}/models/model.json" in names:
        raise ArchiveRejected(
            "the file looks like a torch.export (.pt2) archive but lacks the layout "
            "torch.export.save writes (one folder with archive_format and models/model.json); "
            "save it with torch.export.save, or " + EXPORT_HINT
        )
    if (
        root is None
        or not any(f"{root}/{record}" in names for record in VERSION_RECORDS)
        or not all(f"{root}/{required}" in names for required in REQUIRED)
        or not any(name.startswith(f"{root}/code/") and name.endswith(".py") for name in names)
    ):
        raise ArchiveRejected(
            "the file is a zip archive but not TorchScript (it needs one folder with data.pkl, "
            f"constants.pkl, version and code/): probably a torch.save() checkpoint or state_dict; {EXPORT_HINT}"
        )
    return root


def _check_code(path: Path, root: str, entries: list[Entry]) -> None:
    """Scan every ``code/*.py`` that ``torch.jit.load`` would compile for refused operators."""
    code = [entry for entry in entries if entry.name.startswith(f"{root}/code/") and entry.name.endswith(".py")]
    if sum(entry.size for entry in code) > MAX_CODE_BYTES:
        raise ArchiveRejected(f"the archive's code is larger than the {MAX_CODE_BYTES >> 20} MB accepted")
    try:
        # Safe now: the directory zipfile parses was bounded and counted above.
        with zipfile.ZipFile(path) as archive:
            for entry in code:
                text = archive.read(entry.name).decode("utf-8", errors="replace")
                finding = scan_source(text)
                if finding:
                    raise ArchiveRejected(unsafe_detail(finding) + f" (in {entry.name[len(root) + 1 :][:100]})")
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as error:
        if isinstance(error, ArchiveRejected):
            raise
        raise ArchiveRejected(f"the zip archive is damaged ({error}); upload the complete file again") from None
