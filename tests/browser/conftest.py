"""Browser fixtures: Debian's Chromium, headless, driven by Playwright for Python.

Playwright cannot download its own browser here, so it launches /usr/bin/chromium (`make browser` installs it).
Screenshots go to ``artifacts/`` at the repository root (gitignored).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One Chromium per test module; each test opens its own context (cookies, cache) from it.

    Not per session: Playwright's sync API holds an asyncio loop as the running one while it is started, and
    `asyncio.run()` in later (non-browser) tests would refuse to start."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no {CHROMIUM}: `make browser` installs it (browser tests never skip silently)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go: ``artifacts/`` at the repository root."""
    path = REPO_ROOT / "artifacts"
    path.mkdir(exist_ok=True)
    return path
