"""The dashboard as a person uses it: ``tasqueue dashboard`` served by Hypercorn (on asyncio,
and on Trio), a ``tasqueue worker`` process, both on a real Redis, and Debian's chromium
driven by Playwright (its sync API, ``executable_path`` pointed at the system binary).

A job enqueued by the test appears in the activity feed and the counts change, without a
reload; a running job cancelled from its page has its handler stopped; a failed job
retried from its page ends successful, shown live. The screenshots go to
``docs/_build/screenshots/``, and to ``docs/images/dashboard/`` (the docs' pictures) when
``TASQUEUE_UPDATE_SCREENSHOTS=1``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import dashboard_app
import pytest
from process_support import end_process
from redis_server import RedisServer

from tasqueue_anyio import BlockingClient, Status
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHOTS = ROOT / "docs" / "_build" / "screenshots"
DOC_IMAGES = ROOT / "docs" / "images" / "dashboard"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PATIENCE = 30.0

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/test installs "
    "it): the dashboard is not tested in a browser",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _until(check: Callable[[], bool], what: str) -> None:
    """Wait for another process to get somewhere (it has no way to tell us)."""
    deadline = time.monotonic() + PATIENCE
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(params=["asyncio", "trio"])
def served(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[str, BlockingClient, Path]]:
    """The dashboard's URL (served on ``request.param``), a client on its Redis, and the
    directory where the tasks leave their marks."""
    prefix = f"dash{uuid4().hex[:8]}"
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "PREFIX": prefix,
        "MARKS": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    port = _free_port()
    cli = [sys.executable, "-m", "tasqueue_anyio.cli"]
    logs = [open(tmp_path / name, "w") for name in ("worker.log", "dashboard.log")]  # noqa: SIM115
    worker = subprocess.Popen(
        [*cli, "worker", "dashboard_app:server"], cwd=TESTS, env=env, stderr=logs[0]
    )
    dashboard = subprocess.Popen(
        [*cli, "dashboard", "--app", "dashboard_app:server", "--port", str(port),
         "--backend", request.param],
        cwd=TESTS,
        env=env,
        stderr=logs[1],
    )
    url = f"http://127.0.0.1:{port}"
    client = BlockingClient(
        RedisBroker(redis_server.url, prefix=prefix), RedisResults(redis_server.url, prefix=prefix)
    )
    try:
        _until(lambda: _answers(url + "/") or dashboard.poll() is not None, "the dashboard")
        assert dashboard.poll() is None, (tmp_path / "dashboard.log").read_text()
        with client:
            yield url, client, tmp_path
    finally:
        end_process(dashboard)
        end_process(worker)
        for log in logs:
            log.close()
    assert dashboard.returncode == 0, (tmp_path / "dashboard.log").read_text()  # SIGTERM: clean


def test_live_updates_cancel_and_retry_in_a_browser(
    served: tuple[str, BlockingClient, Path],
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    url, client, marks = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    shots = [SHOTS]
    if os.environ.get("TASQUEUE_UPDATE_SCREENSHOTS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shots.append(DOC_IMAGES)

    def shoot(page: object, name: str, *, in_docs: bool = True) -> None:
        for directory in shots if in_docs else shots[:1]:
            page.screenshot(path=directory / f"{name}.png", full_page=True)  # type: ignore[attr-defined]

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url + "/")
            page.wait_for_selector('#banner:not(:has(.banner))', state="attached")
            page.evaluate("window.sameDocument = true")

            # a job enqueued elsewhere appears and ends, with no reload
            job = client.enqueue(dashboard_app.add, 20, 22)
            row = page.wait_for_selector(f"#activity tr:has-text('{job}')", timeout=PATIENCE * 1000)
            assert row is not None
            assert "successful" in row.inner_text()
            page.wait_for_function(
                "Number(document.querySelector('.successful-total')?.textContent) >= 1",
                timeout=PATIENCE * 1000,
            )
            assert page.evaluate("window.sameDocument") is True
            for n in range(3):
                client.enqueue(dashboard_app.add, n, n)
            page.wait_for_function(
                "Number(document.querySelector('.successful-total')?.textContent) >= 4",
                timeout=PATIENCE * 1000,
            )
            shoot(page, "overview")

            # cancel a running job from its page: its handler is stopped
            running = client.enqueue(dashboard_app.sleeper, "one")
            _until((marks / "one.started").exists, "the sleeper to start")
            page.goto(f"{url}/jobs/{running}")
            page.click("button:has-text('Cancel')")
            page.wait_for_selector("#status:has-text('cancelled')", timeout=PATIENCE * 1000)
            _until((marks / "one.stopped").exists, "the sleeper's handler to stop")
            assert client.job(running).status() is Status.CANCELLED

            # retry a failed job from its page: it ends successful, shown live
            flaky = client.enqueue(dashboard_app.flaky, "two")
            assert client.job(flaky).wait(timeout=PATIENCE).status is Status.FAILED
            page.goto(f"{url}/jobs/{flaky}")
            assert page.inner_text("#status") == "failed"
            shoot(page, "job-failed")
            page.click("button:has-text('Retry')")
            page.wait_for_selector("#status:has-text('successful')", timeout=PATIENCE * 1000)
            assert "the retry worked" in page.inner_text("#job-state")
            shoot(page, "job")

            page.goto(f"{url}/jobs?status=successful")
            assert str(flaky) in page.inner_text("table.jobs")
            shoot(page, "jobs")
            page.goto(f"{url}/queues/web")
            shoot(page, "queue", in_docs=False)  # not shown in the docs
            page.goto(f"{url}/workers")  # the worker process, from its heartbeats
            assert "web\N{MULTIPLICATION SIGN}4" in page.inner_text("table.workers")
            shoot(page, "workers")
        finally:
            browser.close()
