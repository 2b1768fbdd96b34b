"""Flower with basic auth, watched in a real browser while a real pipeline issues a certificate.

The pipeline is ``tests/conftest_stack.py``'s: Pebble, PostgreSQL, Redis and real worker processes
(which send task events: ``-E``). Flower runs as ``make flower`` and the compose service run it:
``celery -A certqueue.flower_app flower`` with the pipeline's ``CERTQUEUE_*`` environment and the
credentials in ``FLOWER_BASIC_AUTH`` (never on the command line). Chromium, logged in, must show the
pipeline's task names on the tasks page; without or with wrong credentials it gets 401.

Needs Debian's ``chromium`` and PyPI's ``playwright``; skips without them unless
``CERTQUEUE_REQUIRE_BROWSER`` is set. Needs PostgreSQL and Redis like every pipeline test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from certqueue.devstack.ports import free_port
from tests.conftest_stack import Pipeline
from tests.integration.test_api_browser import chromium

USER, PASSWORD = "ops", "flower-test-pw"
TASKS = ("certqueue.issue", "certqueue.acme.validate")


@pytest.fixture(scope="module")
def flower(pg_pipeline: Pipeline) -> Iterator[str]:
    """Flower on a free loopback port, watching the pipeline's broker; ready once it has received a
    heartbeat event from the acme worker (so it sees every task sent after that)."""
    port = free_port()
    stack = pg_pipeline.stack
    log_path = stack.workdir / "logs" / "flower.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "certqueue.flower_app", "flower", "--address=127.0.0.1",
         f"--port={port}"],
        cwd=stack.workdir,
        env=stack.full_env({"FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                metrics = requests.get(f"{base}/metrics", timeout=3).text
                if re.search(r'flower_worker_online\{worker="worker-acme@[^"]+"\} 1\.0', metrics):
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (
                "Flower saw no worker heartbeat\n" + log_path.read_text()[-3000:]
            )
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def issued(pg_pipeline: Pipeline, flower: str) -> str:
    cid = pg_pipeline.request(["flower-browser.example.test"])
    pg_pipeline.wait_state(cid, "ACTIVE", timeout=90)
    return cid


def test_tasks_page_shows_the_pipeline_tasks_when_logged_in(flower: str, issued: str, tmp_path: Path) -> None:
    with chromium(tmp_path / "profile", http_credentials={"username": USER, "password": PASSWORD}) as browser:
        page = browser.new_page()
        resp = page.goto(f"{flower}/tasks", wait_until="load", timeout=30_000)
        assert resp is not None and resp.status == 200
        # the task table is filled by the page's JavaScript from /tasks/datatable (same credentials)
        for name in TASKS:
            search = page.locator("input[type=search]").first
            search.fill(name)
            page.locator("#tasks-table td", has_text=name).first.wait_for(timeout=30_000)
        search.fill("")
        page.locator("#tasks-table td", has_text=TASKS[0]).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "flower-tasks.png"), full_page=True)
        table = page.locator("#tasks-table").inner_text()
    assert TASKS[0] in table
    assert (tmp_path / "flower-tasks.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "credentials", [None, {"username": USER, "password": "wrong"}], ids=["none", "wrong"]
)
def test_tasks_page_refuses_without_valid_credentials(flower: str, credentials: dict[str, str] | None,
                                                      tmp_path: Path) -> None:  # fmt: skip
    from playwright.sync_api import Error as PlaywrightError

    options = {"http_credentials": credentials} if credentials else {}
    with chromium(tmp_path / "profile", **options) as browser:
        page = browser.new_page()
        try:
            resp = page.goto(f"{flower}/tasks", wait_until="load", timeout=30_000)
        except PlaywrightError as exc:
            # Chromium gives up on the 401 challenge it has no (valid) answer to
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc), exc
        else:
            assert resp is not None and resp.status == 401
        assert "certqueue." not in page.content()
    for path in ("/tasks", "/api/tasks", "/workers"):
        assert requests.get(f"{flower}{path}", timeout=5).status_code == 401, path


def test_metrics_endpoint_counts_the_pipeline_tasks(flower: str, issued: str) -> None:
    """What docs/operations.md says of Flower's /metrics: served without auth, with per-task counts."""
    text = requests.get(f"{flower}/metrics", timeout=5).text
    for name in TASKS:
        pattern = (
            rf'flower_events_total\{{[^}}]*task="{re.escape(name)}"[^}}]*type="task-succeeded"[^}}]*\}} [1-9]'
        )
        assert re.search(pattern, text), name
