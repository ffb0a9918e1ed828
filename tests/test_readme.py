"""The README is the newcomer's first page: both commands, the curl example, the command line, and
links into the documentation site that all lead somewhere. (The spec reference it once held is now
generated from the schema: tests/test_docs.py.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_shows_both_commands() -> None:
    assert "make run" in README and "make test" in README


def test_readme_shows_the_curl_example_and_the_command_line() -> None:
    assert "curl -s -F model=@model.pt -F 'spec=" in README and "/v1/jobs/$JOB/model" in README
    assert ".venv/bin/modelpress submit model.pt --quantize dynamic" in README


def test_readme_is_short() -> None:
    assert len(README.splitlines()) < 250


def test_every_link_of_the_readme_leads_to_a_file() -> None:
    links = [
        target.split("#")[0]
        for target in re.findall(r"\]\(([^)\s]+)\)", README)
        if not target.startswith(("http://", "https://", "#"))
    ]
    assert links, "the README links to the documentation"
    assert [link for link in links if not (ROOT / link).is_file()] == []
