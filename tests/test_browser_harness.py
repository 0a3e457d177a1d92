"""The browser harness itself: that it sees what a reader's browser would, before it judges real pages."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import browser
import pytest
from browser import is_blank, open_page, require_chromium

pytestmark = pytest.mark.timeout(180)


def _visit(tmp_path, body: str, title: str = "t"):
    require_chromium()
    html = tmp_path / "page.html"
    html.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>{body}</body></html>",
        encoding="utf-8",
    )
    return open_page(html, tmp_path / "shot.png")


def test_a_rendered_page_is_seen_clean(tmp_path):
    visit = _visit(
        tmp_path,
        "<h1>Attribution report</h1><div style='width:300px;height:200px;background:#c0392b'></div>",
        title="Report — ROAR",
    )
    assert visit.title == "Report — ROAR"
    assert visit.console_errors == []
    assert visit.requests == []
    assert visit.screenshot.is_file()
    assert not is_blank(visit.screenshot)


def test_console_errors_are_reported(tmp_path):
    visit = _visit(tmp_path, "<p>x</p><script>console.error('boom')</script>")
    assert any("boom" in e for e in visit.console_errors), visit.console_errors


def test_uncaught_errors_are_reported(tmp_path):
    visit = _visit(tmp_path, "<p>x</p><script>throw new Error('kaput')</script>")
    assert any("kaput" in e for e in visit.console_errors), visit.console_errors


def test_network_requests_are_recorded_and_aborted(tmp_path):
    # The page reports how its fetch ended in the title: aborted requests reject, sent ones would resolve.
    visit = _visit(
        tmp_path,
        "<img src='http://example.invalid/x.png'>"
        "<script>fetch('https://example.invalid/').then(() => { document.title = 'sent' },"
        " () => { document.title = 'blocked' })</script>",
    )
    assert "http://example.invalid/x.png" in visit.requests
    assert "https://example.invalid/" in visit.requests
    assert visit.title == "blocked"


class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_nothing_reaches_a_live_server(tmp_path):
    """A server that would answer sees no request at all: aborted means never sent, loopback included."""
    _Counter.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        visit = _visit(
            tmp_path,
            f"<img src='{base}/x.png'><link rel='stylesheet' href='{base}/s.css'>"
            f"<script>fetch('{base}/api').catch(() => {{}}); new WebSocket('ws://127.0.0.1:{server.server_port}/ws')"
            "</script>",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert _Counter.hits == []
    expected = {f"{base}/x.png", f"{base}/s.css", f"{base}/api", f"ws://127.0.0.1:{server.server_port}/ws"}
    assert expected <= set(visit.requests), visit.requests


def test_an_empty_page_is_blank(tmp_path):
    visit = _visit(tmp_path, "")
    assert visit.console_errors == []
    assert is_blank(visit.screenshot)


def test_local_files_load(tmp_path):
    """Neighbouring files and inline data are local: they load and are not reported as requests."""
    (tmp_path / "style.css").write_text("body { background: #2e86c1 }", encoding="utf-8")
    visit = _visit(
        tmp_path,
        "<link rel='stylesheet' href='style.css'>"
        "<img src='data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7' alt=''>",
    )
    assert visit.requests == []
    assert visit.console_errors == []
    assert is_blank(visit.screenshot)  # one solid colour from the stylesheet...

    from PIL import Image

    with Image.open(visit.screenshot) as image:
        assert image.size == (1280, 900)
        assert image.convert("RGB").getpixel((5, 5)) == (0x2E, 0x86, 0xC1)  # ...and it is the stylesheet's


def test_a_missing_browser_skips_locally_but_fails_in_ci(monkeypatch):
    """In CI a skipped browser test would pass silently over a broken page, so there it must fail."""
    monkeypatch.delenv("ROAR_CHROMIUM", raising=False)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no Chromium"):
        require_chromium()


def test_a_wrong_override_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("ROAR_CHROMIUM", str(tmp_path / "nowhere"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.fail.Exception, match="ROAR_CHROMIUM"):
        require_chromium()
