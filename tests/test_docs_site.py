"""The documentation site as a reader meets it: built with ``sphinx -W -n`` (warnings are
errors), served over HTTP on loopback, and opened in Debian's Chromium (driven by
Playwright's sync API, pointed at the system binary: no browser download). The sidebar and
the "next" links walk the tutorials in order, search finds pages with their text, and code
blocks are highlighted. Screenshots go to ``docs/_build/screenshots/``."""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCREENSHOTS = DOCS / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/test installs "
    "it): the documentation site is not checked in a browser",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The built site, served on a free loopback port; its base URL."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _tutorial_titles() -> list[str]:
    titles = []
    for page in sorted((DOCS / "tutorials").glob("*.md")):
        first = page.read_text().splitlines()[0]
        titles.append(first.removeprefix("# "))
    return titles


def test_navigation_search_and_highlighting(site: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{site}/index.html")
            page.screenshot(path=SCREENSHOTS / "index.png")
            titles = _tutorial_titles()
            assert len(titles) == 8

            # the sidebar leads to the first tutorial, and "next" links walk them in order
            page.locator(".sidebar-tree").get_by_role("link", name=titles[0]).click()
            seen = [page.locator("h1").first.inner_text().rstrip("¶").strip()]
            for _ in titles[1:]:
                page.locator("a.next-page").click()
                seen.append(page.locator("h1").first.inner_text().rstrip("¶").strip())
            assert seen == titles

            # code is highlighted: keywords are spans of their own, in another colour
            page.goto(f"{site}/tutorials/01-first-job.html")
            keyword = page.locator("div.highlight-python span.k").first
            assert keyword.inner_text() in {"async", "def", "await", "return", "from", "import"}
            plain = page.locator("div.highlight-python pre").first
            colour = "el => getComputedStyle(el).color"
            assert keyword.evaluate(colour) != plain.evaluate(colour)
            page.screenshot(path=SCREENSHOTS / "tutorial-1.png")

            # search finds the cancellation tutorial, with a snippet of its text
            page.goto(f"{site}/search.html?q=cancel+scope")
            page.wait_for_selector("ul.search li p.context", timeout=20_000)
            results = page.locator("ul.search li")
            names = [results.nth(i).locator("a").first.inner_text() for i in range(results.count())]
            assert titles[2] in names, names
            page.screenshot(path=SCREENSHOTS / "search.png")

            # the diagram of tutorial 3 loads
            page.goto(f"{site}/tutorials/03-retries-timeouts.html")
            image = page.locator("img[src$='scopes.svg']")
            assert image.evaluate("img => img.complete && img.naturalWidth > 0")
            assert re.search(r"cancel scope", page.locator("article").inner_text())
        finally:
            browser.close()
