"""A real browser for the console: Playwright driving Debian's chromium, headless, against the real stack.

Every page a test opens records its requests and console messages; a test fails if any request
left the service or the console logged an error. chromium missing is a failure that says how to
install it (``make test`` installs it where it can), never a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = (
    "the browser tests need Debian's chromium: run `make chromium` (as root, it runs "
    "`apt-get install -y chromium`), or install it yourself, e.g. `sudo apt-get install chromium`; "
    "or point MODELPRESS_CHROMIUM at a chromium binary"
)


def chromium_path() -> str:
    path = os.environ.get("MODELPRESS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not Path(path).exists():
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Recorder:
    """What a page did: every request URL, console errors and uncaught script errors."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.errors: list[str] = []

    def attach(self, page) -> None:
        page.on("request", lambda request: self.requests.append(request.url))
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"console {message.type}: {message.text}")
                if message.type in ("error", "assert")
                else None
            ),
        )
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def outside(self, base_url: str) -> list[str]:
        origin = urlsplit(base_url).netloc
        return [
            url
            for url in self.requests
            if not url.startswith(("data:", "blob:", "about:")) and urlsplit(url).netloc != origin
        ]


def open_page(browser, base_url: str, recorder: Recorder, **context_options):
    context = browser.new_context(base_url=base_url, accept_downloads=True, **context_options)
    page = context.new_page()
    page.set_default_timeout(30_000)
    recorder.attach(page)
    return context, page


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def page(browser, stack, recorder):
    """A fresh browser context on the shared stack; afterwards nothing may have left the service or errored."""
    context, opened = open_page(browser, stack.base_url, recorder, viewport={"width": 1000, "height": 900})
    yield opened
    context.close()
    assert recorder.requests, "the page made no requests at all"
    assert recorder.outside(stack.base_url) == [], "requests outside the service"
    assert recorder.errors == [], "console errors"
