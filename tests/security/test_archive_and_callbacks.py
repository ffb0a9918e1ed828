"""Checks that run without a stack: the zip directory reader, the accepted archive layouts, callback addresses."""

from __future__ import annotations

import http.server
import socket
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.archive import ArchiveRejected, check_torchscript_archive, read_directory
from modelpress.webhooks import CallbackRefused, check_callback_url, send_pinned
from tests.models import SmallConvNet, save_scripted

LIMIT = 1 << 30


class Attention(nn.Module):
    """Saved by torch with its version record at <root>/.data/version (a newer dynamic format version)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x) + F.gelu(self.proj(x))


def test_both_version_record_locations_that_torch_writes_are_accepted(tmp_path: Path) -> None:
    attention = save_scripted(Attention(), tmp_path / "attention.pt")
    conv = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    names = {path: set(zipfile.ZipFile(path).namelist()) for path in (attention, conv)}
    assert "attention/.data/version" in names[attention] and "attention/version" not in names[attention]
    assert "conv/version" in names[conv]

    for path in (attention, conv):
        check_torchscript_archive(path, LIMIT)
        torch.jit.load(str(path))  # and torch agrees


def _rewritten(source: Path, target: Path, first: str | None = None, drop: str | None = None) -> Path:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as archive:
        if first:
            archive.writestr(first, b"x")
        for entry in original.infolist():
            if not (drop and entry.filename.endswith(drop)):
                archive.writestr(entry.filename, original.read(entry))
    return target


def test_layouts_torch_refuses_are_refused(tmp_path: Path) -> None:
    model = save_scripted(Attention(), tmp_path / "m.pt")
    for variant in (
        _rewritten(model, tmp_path / "a.pt", first="other/readme"),  # torch's root is the first entry's
        _rewritten(model, tmp_path / "b.pt", drop="version"),
        _rewritten(model, tmp_path / "c.pt", drop="constants.pkl"),
    ):
        with pytest.raises(Exception):  # noqa: B017  torch refuses it, in its own words
            torch.jit.load(str(variant))
        with pytest.raises(ArchiveRejected, match="not TorchScript"):
            check_torchscript_archive(variant, LIMIT)
    check_torchscript_archive(_rewritten(model, tmp_path / "d.pt"), LIMIT)  # rewritten by zipfile, no zip64 records


def _lying_zip(path: Path, entries: int, declared: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(entries):
            archive.writestr(f"m/{index}", b"")
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, declared, declared)
    path.write_bytes(bytes(data))
    return path


def test_an_end_record_that_lies_about_the_entry_count_is_refused(tmp_path: Path) -> None:
    liar = _lying_zip(tmp_path / "liar.zip", 30_000, 3)
    with pytest.raises(ArchiveRejected, match="entries"):
        read_directory(liar)


def test_a_directory_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    path = save_scripted(SmallConvNet(), tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<L", data, end + 12, 0x7FFFFFF0)  # directory size
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveRejected):
        read_directory(path)


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.1",
        "10.0.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "0.1.2.3",
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "240.0.0.1",
        "198.18.0.1",
        "[::1]",
        "[::ffff:10.0.0.1]",
        "[::ffff:8.8.8.8]",
        "[64:ff9b::a00:1]",
        "[fd00::1]",
        "[fe80::1]",
        "[ff02::1]",
        "[2001:db8::1]",
        "[2002:a00:1::1]",
    ],
)
def test_callbacks_to_addresses_that_are_not_global_unicast_are_refused(address: str) -> None:
    with pytest.raises(CallbackRefused, match="not a global unicast address"):
        check_callback_url(f"http://{address}/hook", allow_private=False)


def test_a_global_unicast_address_is_accepted() -> None:
    assert check_callback_url("https://8.8.8.8/hook", allow_private=False) == ["8.8.8.8"]


def test_the_callback_goes_to_the_address_that_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS answers 127.0.0.1 to the check and another address afterwards: the request still goes to 127.0.0.1."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers["Host"])
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)  # a redirect is not followed: the status is the answer
            self.send_header("Location", "http://10.0.0.1/")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real = socket.getaddrinfo
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.server_port))]])

    def rebinding(host, *args, **kwargs):
        if host == "hooks.example":
            return next(answers, [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.255.255.1", server.server_port))])
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        status = send_pinned(
            f"http://hooks.example:{server.server_port}/hook", b"{}", {}, allow_private=True, timeout=5
        )
    finally:
        server.shutdown()
    assert status == 302
    assert seen == [f"hooks.example:{server.server_port}"]


def test_only_the_exact_word_off_turns_the_sandbox_off() -> None:
    from modelpress.config import Settings

    assert Settings.from_env({"MODELPRESS_SANDBOX": "OFF"}).sandbox == "off"
    assert Settings.from_env({}).sandbox == "on"
    for typo in ("of", "false", "0", "disabled"):
        with pytest.raises(ValueError, match="MODELPRESS_SANDBOX"):
            Settings.from_env({"MODELPRESS_SANDBOX": typo})


def test_the_start_up_self_test_says_confined_unavailable_or_off(tmp_path: Path) -> None:
    from modelpress.config import Settings
    from workers.sandbox import self_test

    settings = Settings(data_dir=tmp_path)
    confined = self_test(settings)
    missing = self_test(settings.with_changes(bwrap=str(tmp_path / "no-such-bwrap")))
    off = self_test(settings.with_changes(sandbox="off"))

    assert (confined.state, confined.ready) == ("confined", True), confined.detail
    assert (missing.state, missing.ready) == ("unavailable", False) and "no-such-bwrap" in missing.detail
    assert (off.state, off.ready) == ("off", True) and "unconfined" in off.detail
