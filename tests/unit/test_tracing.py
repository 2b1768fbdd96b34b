"""Optional OpenTelemetry tracing (``monitoring.tracing``, the ``tracing`` extra): off by default;
on, one trace runs from the API request through the published task message to the HTTP call a
task makes to the CA (the W3C ``traceparent`` header is carried in the Celery message and sent to
the CA). Each case runs in its own process: instrumentation patches FastAPI, Celery and requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from certqueue.config import MonitoringSettings

REDIS_URL = os.environ.get("CERTQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REPO = Path(__file__).resolve().parents[2]


def run(mode: str, tmp_path: Path) -> dict[str, object]:
    queue = f"trace-{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CERTQUEUE_", "OTEL_"))},
        "CERTQUEUE_SETTINGS_DIR": str(tmp_path),
        "TRACE_BROKER": REDIS_URL,
        "TRACE_QUEUE": queue,
        "PYTHONPATH": str(REPO),
    }
    try:
        res = subprocess.run(
            [sys.executable, "-m", "tests.unit._tracing_check", mode],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        redis.Redis.from_url(REDIS_URL).delete(queue)
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def test_tracing_is_off_by_default(tmp_path: Path) -> None:
    assert MonitoringSettings().tracing is False
    out = run("off", tmp_path)
    assert out["spans"] == [] and out["ca_traceparent"] is None and out["task_traceparent"] is None


def test_one_trace_from_api_request_to_task_message_to_ca_call(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.instrumentation.celery")
    out = run("on", tmp_path)
    spans = out["spans"]
    assert isinstance(spans, list) and spans
    traces = {s["trace"] for s in spans}
    assert len(traces) == 1, spans  # API server span, Celery publish span, requests client span
    (trace_id,) = traces
    names = " ".join(s["name"] for s in spans)
    assert "POST /issue" in names and "apply_async/certqueue.trace" in names and "GET" in names
    for carried in (out["task_traceparent"], out["ca_traceparent"]):
        assert isinstance(carried, str) and carried.split("-")[1] == trace_id
