"""scripts/install.py hands pip's configuration to uv: a machine whose packages come from its own
indexes, wheel folders and constraints gets the same packages whichever installs them."""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install.py"


def _install_module():
    spec = importlib.util.spec_from_file_location("install_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pips_indexes_wheel_folders_and_constraints_reach_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pip.conf"
    config.write_text(
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url = file:///srv/one/simple file:///srv/two/simple\n"
        f"constraint = {tmp_path / 'constraints.txt'}\n"
        "timeout = 60\n"
    )
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("PIP_FIND_LINKS", "/srv/wheels")

    command = _install_module().uv_command(".[test]")

    pairs = list(itertools.pairwise(command))
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--extra-index-url", "file:///srv/one/simple") in pairs
    assert ("--extra-index-url", "file:///srv/two/simple") in pairs
    assert ("--constraint", str(tmp_path / "constraints.txt")) in pairs
    assert ("--find-links", "/srv/wheels") in pairs
    assert "--compile-bytecode" in command  # jobs see the environment read-only: .pyc files made now
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip treats every index alike
    assert "60" not in command  # an option uv does not share is not passed
    assert command[-2:] == ["--editable", ".[test]"]
