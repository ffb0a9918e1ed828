"""Hostile zip archives for the tests, built by writing their header fields instead of doing the work.

Compressing 2 GB of zeros for real takes seconds of CPU, and so does writing 200,000 entries through
``zipfile``; both archives are the same bytes when their headers are written directly. Each builder
checks its result with ``zipfile``, so a mistake here fails the test that uses it rather than
passing it."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name, extra
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_STORED, _DEFLATED = 0, 8


def _archive(entries: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """Zip ``(name, stored bytes, method, crc, uncompressed size)`` entries, with sizes as given."""
    body, central = bytearray(), bytearray()
    for name, data, method, crc, size in entries:
        encoded = name.encode()
        offset = len(body)
        body += _LOCAL.pack(0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(encoded), 0)
        body += encoded + data
        central += _CENTRAL.pack(
            0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size, len(encoded), 0, 0, 0, 0, 0, offset
        )
        central += encoded
    count = min(len(entries), 0xFFFF)
    end = _END.pack(0x06054B50, 0, 0, count, count, len(central), len(body), 0)
    return bytes(body + central + end)


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return name, data, _STORED, zlib.crc32(data), len(data)


def zeros_deflated(name: str, mebibytes: int) -> tuple[str, bytes, int, int, int]:
    """An entry that inflates to ``mebibytes`` MiB of zeros: one fully flushed deflate block of 1 MiB,
    repeated (a full flush makes each copy independent of the one before), then an empty final block."""
    assert mebibytes < 4096, "sizes of 4 GiB or more need zip64 fields"
    chunk = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = block * mebibytes + compressor.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(chunk, crc)
    return name, stream, _DEFLATED, crc, mebibytes << 20


def archive(*entries: tuple[str, bytes, int, int, int]) -> bytes:
    """A genuine zip of these entries (checked by ``zipfile``: names, sizes and the first MiB inflate)."""
    built = _archive(list(entries))
    with zipfile.ZipFile(io.BytesIO(built)) as check:
        infos = check.infolist()
        assert [info.filename for info in infos] == [entry[0] for entry in entries]
        assert [info.file_size for info in infos] == [entry[4] for entry in entries]
        for info in infos:
            with check.open(info) as opened:
                head = opened.read(1 << 20)
            assert len(head) == min(info.file_size, 1 << 20)
    return built


def many_empty_entries(names: list[str], count: int, prefix: str) -> bytes:
    """The entries ``names`` (one byte ``x`` each), then ``count`` empty ones named ``prefix<index>``.

    Not checked by ``archive()``: reading 200,000 entries back is the cost this builder avoids; the tests
    that use it count them with ``zipfile`` once."""
    entries = [stored(name, b"x") for name in names]
    empty_crc = zlib.crc32(b"")
    entries += [(f"{prefix}{index}", b"", _STORED, empty_crc, 0) for index in range(count)]
    return _archive(entries)
