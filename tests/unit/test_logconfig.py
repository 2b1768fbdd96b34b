"""``logging.json`` does what it says: one JSON object per line (python-json-logger) with task id,
certificate id and region as fields, through the redaction filter; text otherwise. The task fields
are proven in a real Celery worker process on the real Redis broker."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from certqueue import logconfig
from certqueue.config import Settings

REDIS_URL = os.environ.get("CERTQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def capture(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., io.StringIO]]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def make(**overrides: object) -> io.StringIO:
        stream = io.StringIO()
        logconfig.configure_logging(settings_factory(**overrides), stream=stream)
        return stream

    yield make
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_lines_carry_the_context_fields(capture: Callable[..., io.StringIO]) -> None:
    stream = capture(**{"logging.json": True})
    log = logging.getLogger("certqueue.test")
    log.info("plain %s", "message")
    with logconfig.log_context(certificate_id="cert_abc", region="eu-west-1"):
        log.warning("inside")
        log.info("explicit", extra={"certificate_id": "cert_other"})
    log.info("after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["message"] for r in lines] == ["plain message", "inside", "explicit", "after"]
    assert {k: lines[0][k] for k in ("level", "logger")} == {"level": "INFO", "logger": "certqueue.test"}
    assert "time" in lines[0] and "certificate_id" not in lines[0]
    assert (lines[1]["certificate_id"], lines[1]["region"]) == ("cert_abc", "eu-west-1")
    assert lines[2]["certificate_id"] == "cert_other"  # the caller's extra wins
    assert "region" not in lines[3]


def test_json_lines_are_redacted(capture: Callable[..., io.StringIO]) -> None:
    stream = capture(**{"logging.json": True})
    logging.getLogger("certqueue.test").error(
        "oops %s", "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----"
    )
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert "MHcCAQEEIB" not in line and "[REDACTED PRIVATE KEY]" in record["message"]


def test_text_is_the_default(capture: Callable[..., io.StringIO]) -> None:
    stream = capture()
    logging.getLogger("certqueue.test").info("hello")
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("INFO certqueue.test: hello")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_a_real_worker_logs_task_id_certificate_and_region_as_json(tmp_path: Path) -> None:
    queue = f"logtest-{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")},
        "CERTQUEUE_SETTINGS_DIR": str(tmp_path),
        "CERTQUEUE_LOGGING__JSON": "true",
        "LOGTEST_BROKER": REDIS_URL,
        "LOGTEST_QUEUE": queue,
        "PYTHONPATH": str(REPO),
    }
    err = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.unit._log_worker_app", "worker", "-P", "solo",
         "-Q", queue, "-n", f"{queue}@%h", "--without-mingle", "--without-gossip", "--without-heartbeat"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
    )  # fmt: skip
    from celery import Celery

    client = Celery("logtest-client", broker=REDIS_URL, set_as_current=False)
    try:
        kwargs = {"region": "eu-west-1", "issuance_id": 7}
        args = ["cert_logtest0000000001"]
        result_id = client.send_task("logtest.deploy", args=args, kwargs=kwargs, queue=queue).id
        deadline = time.monotonic() + 60
        records: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            lines = (tmp_path / "worker.log").read_text(errors="replace").splitlines()
            records = [json.loads(x) for x in lines if x.startswith("{")]
            if any(r.get("message") == "deploying issuance 7" for r in records):
                break
            assert proc.poll() is None, "\n".join(lines)
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        err.close()
        redis.Redis.from_url(REDIS_URL).delete(queue)
    text = (tmp_path / "worker.log").read_text(errors="replace")
    mine = [r for r in records if r.get("logger") == "certqueue.tasks.logtest"]
    assert mine, text
    for r in mine:
        assert r["task_id"] == result_id and r["task"] == "logtest.deploy"
        assert r["certificate_id"] == "cert_logtest0000000001" and r["region"] == "eu-west-1"
    assert "MIIEvQIBADANBg" not in text and "[REDACTED PRIVATE KEY]" in text
    # the worker's own lines (celery's loggers) are JSON too: Celery left the handler alone
    assert any(str(r.get("logger", "")).startswith("celery") for r in records), text
    assert all(x.startswith("{") for x in text.splitlines() if '"level"' in x)


class _Task:
    name = "t"

    def __init__(self, run: object) -> None:
        self.run = run


def _issue(payload: dict[str, object], _transient: int = 0) -> None: ...
def _batch(jobs: list[dict[str, object]], _transient: int = 0) -> None: ...
def _deploy(certificate_id: str, region: str, issuance_id: int) -> None: ...


@pytest.mark.parametrize(
    ("run", "args", "kwargs", "fields"),
    [
        (_deploy, ["cert_a", "eu-west-1", 3], {}, {"certificate_id": "cert_a", "region": "eu-west-1"}),
        (_issue, [{"v": 1, "certificate_id": "cert_b"}], {}, {"certificate_id": "cert_b"}),
        (_batch, [[{"certificate_id": "cert_c"}]], {}, {"certificate_id": "cert_c"}),
        (_batch, [[{"certificate_id": "cert_c"}, {"certificate_id": "cert_d"}]], {}, {}),
        (_deploy, [], {"certificate_id": "cert_e", "region": "us-east-1", "issuance_id": 1},
         {"certificate_id": "cert_e", "region": "us-east-1"}),
    ],
)  # fmt: skip
def test_task_fields_from_the_task_arguments(
    run: object, args: list[object], kwargs: dict[str, object], fields: dict[str, str]
) -> None:
    assert logconfig._task_fields(_Task(run), args, kwargs) == fields
