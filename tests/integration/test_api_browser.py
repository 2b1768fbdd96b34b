"""The REST API's interactive docs in a real browser: ``certqueue serve`` (a subprocess on a migrated
temp SQLite database) and headless Chromium (Debian's ``chromium``, driven by Playwright's Python
package). Swagger UI must render the certificate endpoints from assets the API serves itself: the
machine has no route to a CDN, and neither do most servers running certqueue.

Needs Debian's ``chromium`` and PyPI's ``playwright`` (never ``playwright install``: it downloads a
browser). Without them the test skips, unless ``CERTQUEUE_REQUIRE_BROWSER`` is set: then it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.ports import free_port

CHROMIUM = "/usr/bin/chromium"
# Playwright adds --headless and --user-data-dir itself
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _unavailable(why: str) -> None:
    if os.environ.get("CERTQUEUE_REQUIRE_BROWSER"):
        pytest.fail(f"{why} (CERTQUEUE_REQUIRE_BROWSER is set)")
    pytest.skip(why)


@contextmanager
def chromium(profile: Path, **context_options: Any) -> Iterator[Any]:
    """Headless Chromium with a fresh profile in ``profile``: a Playwright ``BrowserContext``."""
    exe = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not exe:
        _unavailable("Debian's chromium is not installed (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=exe,
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=60_000,
            **context_options,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[str]:
    """``python -m certqueue serve`` on a free loopback port, on a migrated temp SQLite database."""
    port = free_port()
    (tmp_path / "settings").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")}
    env.update(
        {
            "CERTQUEUE_SETTINGS_DIR": str(tmp_path / "settings"),
            "CERTQUEUE_DATABASE__URL": f"sqlite:///{tmp_path / 'certqueue.db'}",
            "CERTQUEUE_BROKER__FILESYSTEM_PATH": str(tmp_path / "broker"),
            "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(tmp_path / "master.key"),
            "CERTQUEUE_API__HOST": "127.0.0.1",
            "CERTQUEUE_API__PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    cli = [sys.executable, "-m", "certqueue"]
    subprocess.run(
        [*cli, "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120
    )
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [*cli, "serve"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (
                "certqueue serve did not answer /health\n" + (tmp_path / "serve.log").read_text()
            )
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_swagger_ui_renders_the_certificate_endpoints_without_a_cdn(api_server: str, tmp_path: Path) -> None:
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        requested: list[str] = []
        failed: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.on("requestfailed", lambda r: failed.append(r.url))
        resp = page.goto(f"{api_server}/docs", wait_until="load", timeout=30_000)
        assert resp is not None and resp.status == 200
        # Swagger UI builds the page in the browser from /openapi.json: these exist only if its
        # JavaScript loaded and ran
        page.wait_for_selector("#swagger-ui .opblock-tag-section", timeout=30_000)
        page.wait_for_selector('.opblock-summary-path[data-path="/v1/certificates"]', timeout=30_000)
        page.screenshot(path=str(tmp_path / "swagger-ui.png"), full_page=True)
        tags = page.locator(".opblock-tag").all_inner_texts()
        paths = set(page.locator(".opblock-summary-path").evaluate_all("els => els.map(e => e.dataset.path)"))
        title = page.locator(".info .title").first.inner_text()
    assert any(t.strip().lower().startswith("certificates") for t in tags), tags
    assert {
        "/v1/certificates",
        "/v1/certificates/{certificate_id}",
        "/health",
        "/health/certificates",
    } <= paths
    assert "certqueue" in title
    assert not failed, f"requests failed: {failed}"
    outside = [u for u in requested if not u.startswith(api_server)]
    assert not outside, f"the docs page fetched from outside the API: {outside}"
    assert any(u.endswith("swagger-ui-bundle.js") for u in requested)
    assert (tmp_path / "swagger-ui.png").stat().st_size > 10_000
