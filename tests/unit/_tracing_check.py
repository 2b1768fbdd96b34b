"""Run by tests/unit/test_tracing.py in its own process (tracing patches FastAPI, Celery and
requests process-wide): one API request that publishes a task and calls an HTTP server the way
an ACME call does; prints what the spans and the carried headers were, as JSON."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from certqueue.config import configure
from certqueue.logconfig import setup_tracing

settings = configure(
    {"monitoring.tracing": sys.argv[1] == "on", "broker.url": os.environ["TRACE_BROKER"]}
).settings
exporter = InMemorySpanExporter()
if settings.monitoring.tracing:
    setup_tracing(settings, exporter=exporter, service="certqueue-test")

seen: dict[str, Any] = {}


class CA(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        seen["traceparent"] = self.headers.get("traceparent")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_a: object) -> None:
        pass


ca = HTTPServer(("127.0.0.1", 0), CA)
threading.Thread(target=ca.serve_forever, daemon=True).start()

import requests  # noqa: E402
from celery import Celery  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

celery_app = Celery("trace", broker=os.environ["TRACE_BROKER"], set_as_current=False)
app = FastAPI()


@app.post("/issue")
def issue() -> dict[str, str]:
    msg = celery_app.send_task("certqueue.trace", queue=os.environ["TRACE_QUEUE"])
    requests.get(f"http://127.0.0.1:{ca.server_address[1]}/acme/new-order", timeout=5)
    return {"task": msg.id}


with TestClient(app) as client:
    client.post("/issue")
import redis  # noqa: E402

(raw,) = redis.Redis.from_url(os.environ["TRACE_BROKER"]).lrange(os.environ["TRACE_QUEUE"], 0, -1)
spans = exporter.get_finished_spans()
print(json.dumps({
    "ca_traceparent": seen.get("traceparent"),
    "task_traceparent": json.loads(raw)["headers"].get("traceparent"),
    "spans": [{"name": s.name, "trace": format(s.context.trace_id, "032x"),
               "parent": format(s.parent.span_id, "016x") if s.parent else None,
               "id": format(s.context.span_id, "016x")} for s in spans],
}))  # fmt: skip
