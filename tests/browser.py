"""Open a local HTML file in real headless Chromium and report what the browser saw.

A file that parses is not a page that renders: scripts can throw, assets can be missing, and a page can
quietly reach for the network. Tests of HTML output use this to look at it the way a reader's browser does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Schemes that stay on this machine; any other request is aborted and reported.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# --no-sandbox: Chromium's sandbox refuses to start as root, as in containers.
# --disable-gpu: there is no GPU; software rendering gives the same pixels everywhere.
# --disable-dev-shm-usage: containers often have a tiny /dev/shm, on which Chromium crashes.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")

# A second fence behind the request router: whatever escapes it (a WebSocket, a prefetch) is sent to a
# closed local port instead of the network, loopback included.
DEAD_PROXY = {"server": "http://127.0.0.1:9", "bypass": "<-loopback>"}


@dataclass
class PageVisit:
    """What one visit showed: errors a reader's console would show, attempted requests, the first screen."""

    screenshot: Path
    title: str = ""
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def chromium_path() -> str | None:
    """The system Chromium (``ROAR_CHROMIUM`` overrides), so no browser is ever downloaded."""
    override = os.environ.get("ROAR_CHROMIUM")
    if override:
        return override
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(reason: str) -> None:
    """Skip locally, but fail in CI: there a skipped browser test would hide a broken page."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


def require_chromium() -> str:
    """The Chromium executable, after making sure Playwright can drive it; skip (fail in CI) otherwise."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright for Python is not installed (pip install 'playwright>=1.40')")
    path = chromium_path()
    if path is None:
        _missing("no Chromium found: install Debian's chromium package or set ROAR_CHROMIUM")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        # A wrong explicit setting is a mistake to report, not a reason to skip.
        pytest.fail(f"ROAR_CHROMIUM={path!r} is not an executable file", pytrace=False)
    return path


def _is_local(url: str) -> bool:
    return url.lower().startswith(LOCAL_SCHEMES)


def open_page(html: Path, screenshot: Path, width: int = 1280, height: int = 900, timeout_s: float = 60) -> PageVisit:
    """Load ``html`` from disk with the network cut off, and screenshot the first screen a reader sees.

    Every request outside file:, data:, blob: and about: is aborted before it leaves the browser and
    recorded, so a page that depends on the network shows up in ``requests`` (and usually as a console
    error) instead of working by luck where there is internet.
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no Chromium found: install Debian's chromium package or set ROAR_CHROMIUM")
    html, screenshot = Path(html).resolve(), Path(screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    visit = PageVisit(screenshot=screenshot)
    timeout_ms = timeout_s * 1000

    def route(route, request) -> None:
        if _is_local(request.url):
            route.continue_()
        else:
            visit.requests.append(request.url)
            route.abort("blockedbyclient")

    def console(message) -> None:
        if message.type == "error":
            visit.console_errors.append(message.text)

    def page_error(error) -> None:
        visit.console_errors.append(f"{error.name}: {error.message}" if error.name else error.message)

    def websocket(ws) -> None:
        # WebSockets bypass the request router; the dead proxy stops them, this records them.
        if not _is_local(ws.url):
            visit.requests.append(ws.url)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            proxy=DEAD_PROXY,
            timeout=timeout_ms,
        )
        try:
            # A context-wide route also covers pop-ups the page might open.
            context = browser.new_context(viewport={"width": width, "height": height}, service_workers="block")
            context.set_default_timeout(timeout_ms)
            context.route("**/*", route)
            page = context.new_page()
            page.on("console", console)
            page.on("pageerror", page_error)
            page.on("websocket", websocket)
            page.goto(html.as_uri(), wait_until="load")
            # Requests started by scripts (fetch) need not hold up "load": let them reach the router. A page
            # that keeps polling never goes idle; it is still reported, with what it asked for so far.
            with contextlib.suppress(PlaywrightError):
                page.wait_for_load_state("networkidle", timeout=min(timeout_ms, 10_000))
            visit.title = page.title()
            page.screenshot(path=str(screenshot), full_page=False)
            context.close()
        finally:
            browser.close()
    return visit


def is_blank(png: Path, tolerance: float = 0.005) -> bool:
    """True if (nearly) every pixel has the most common colour: a page that rendered nothing visible."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGBA"), dtype=np.uint8).reshape(-1, 4)
    if pixels.size == 0:
        return True
    packed = pixels.view(np.uint32).ravel()
    _, counts = np.unique(packed, return_counts=True)
    return 1 - counts.max() / packed.size < tolerance
