"""Flower with basic auth, watched in a real browser while a real pipeline issues a certificate.

The pipeline is ``tests/conftest_stack.py``'s (``build_pipeline``): Pebble, PostgreSQL, Redis and
real worker processes (which send task events: ``-E``). Flower runs as ``make flower`` and the
compose service run it: ``celery -A certqueue.flower_app flower`` with the pipeline's
``CERTQUEUE_*`` environment and the credentials in ``FLOWER_BASIC_AUTH`` (never on the command
line). Chromium, logged in, must show the pipeline's task names on the tasks page; without or with
wrong credentials it is refused (401).

Needs Debian's ``chromium`` and PyPI's ``playwright``; skips without them unless
``CERTQUEUE_REQUIRE_BROWSER`` is set. Needs PostgreSQL and Redis like every pipeline test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devstack.ports import free_port
from tests import conftest_stack
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline
from tests.integration.test_api_browser import chromium

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "ops", "flower-test-pw"
TASKS = ("certqueue.issue", "certqueue.acme.issue_batch")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """``conftest_stack``'s PostgreSQL pipeline, on a Redis database no other test process is using.

    ``build_pipeline`` picks the first Redis database free in this process; a test run in another
    process on the same Redis (the machine is shared) may be using it, and its workers would then
    take this pipeline's tasks. Databases holding keys count as taken while this one is chosen.
    """
    import redis

    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    client = redis.Redis(host=conftest_stack.REDIS_HOST, socket_timeout=3)
    busy = set()
    for db in conftest_stack._REDIS_DBS:
        client.execute_command("SELECT", db)
        if client.dbsize() and db not in conftest_stack._redis_in_use:
            busy.add(db)
    client.close()
    conftest_stack._redis_in_use.update(busy)
    try:
        p = build_pipeline(tmp_path_factory.mktemp("flower-pipeline"), backend="postgres")
    finally:
        conftest_stack._redis_in_use.difference_update(busy)
    yield p
    teardown_pipeline(p)


@pytest.fixture(scope="module")
def flower(pipeline: Pipeline) -> Iterator[str]:
    """Flower on a free loopback port, watching the pipeline's broker; ready once it has received a
    heartbeat event from the acme worker (so it sees every task sent after that)."""
    port = free_port()
    stack = pipeline.stack
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
def issued(pipeline: Pipeline, flower: str) -> str:
    cid = pipeline.request(["flower-browser.example.test"])
    pipeline.wait_state(cid, "ACTIVE", timeout=90)
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
            assert "certqueue." not in resp.text()
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
    documented = set(re.findall(r"`(flower_[a-z_]+)", (REPO / "docs" / "operations.md").read_text()))
    assert documented, "docs/operations.md documents Flower's metrics"
    exported = set(re.findall(r"^# TYPE (flower_[a-z_]+)", text, re.MULTILINE))
    exported |= {n.removesuffix("_total") for n in exported} | {n + "_total" for n in exported}
    assert documented <= exported, f"documented but not exported: {sorted(documented - exported)}"


@pytest.mark.parametrize(
    "path",
    [
        "/api/task/async-apply/certqueue.revoke",
        "/api/task/send-task/certqueue.revoke",
        "/api/task/apply/certqueue.revoke",
        "/api/worker/shutdown/worker-acme@localhost",
    ],
)
def test_the_task_api_is_blocked_even_for_flower_users(
    pipeline: Pipeline, flower: str, issued: str, path: str
) -> None:
    """Issue 13, finding 5: a Flower login must not revoke (or deploy) a certificate without the REST
    API's scopes. Flower answers 403 for every route that sends a task or controls a worker."""
    payload = {"args": [{"v": 1, "certificate_id": issued, "reason": "keyCompromise"}]}
    resp = requests.post(f"{flower}{path}", json=payload, auth=(USER, PASSWORD), timeout=10)
    assert resp.status_code == 403, resp.text
    assert "read-only" in resp.json()["error"]
    assert requests.get(f"{flower}/api/tasks", auth=(USER, PASSWORD), timeout=10).status_code == 200
    time.sleep(1.0)  # a revoke, had one been sent, would be running by now
    assert pipeline.state(issued) == "ACTIVE"
