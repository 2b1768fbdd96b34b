"""Process logging and (optional) tracing, set up once per process by the CLI.

Owns: the root logger's handler, the log context (task id, certificate id, region) and, with
``monitoring.tracing``, the OpenTelemetry tracer provider. Every line goes to stderr, through the
redaction filter of ``certqueue.logsafe``:

* ``logging.json: false``: ``time level logger: message`` text;
* ``logging.json: true``: one JSON object per line (python-json-logger) with ``time``, ``level``,
  ``logger``, ``message`` and, where known, ``task_id``, ``task``, ``certificate_id``, ``region``
  (and ``trace_id``/``span_id`` with tracing), so a log pipeline can filter one certificate's story.

Celery would otherwise replace the root handler in workers and beat (``worker_hijack_root_logger``):
a receiver on its ``setup_logging`` signal tells it to leave logging alone. Task context comes from
``task_prerun``: the task id and name, and ``certificate_id`` / ``region`` from the task's own
arguments (also inside a payload dict; a batch of one counts as that one). A batch of many has no
single certificate: code inside it adds the field per item with :func:`log_context`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import sys
from collections.abc import Iterator
from typing import Any

from certqueue.config import Settings
from certqueue.errors import ConfigError

#: fields a record may carry, in the order they are written
CONTEXT_FIELDS = ("task_id", "task", "certificate_id", "region", "trace_id", "span_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("certqueue_log_context", default={})  # noqa: B039
_task_tokens: dict[str, contextvars.Token[dict[str, str]]] = {}
_celery_connected = False


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (``certificate_id=...``, ``region=...``) to every record logged inside the block."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the log context (and the current trace) on each record, without overriding an
    ``extra=`` the caller passed."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if not hasattr(record, "task_id"):
            task_id, name = _current_task()
            if task_id:
                record.task_id = task_id
                record.task = name
        _add_trace(record)
        return True


def _current_task() -> tuple[str | None, str | None]:
    with contextlib.suppress(Exception):  # logging must never fail
        from celery import current_task

        req = current_task.request if current_task else None
        if req is not None and req.id:
            return str(req.id), str(current_task.name)
    return None, None


def _add_trace(record: logging.LogRecord) -> None:
    if not _tracing_on:
        return
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        record.trace_id = format(ctx.trace_id, "032x")
        record.span_id = format(ctx.span_id, "016x")


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        # uvicorn adds an ANSI-coloured copy of each message: not for a log pipeline
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        json_ensure_ascii=False,
    )


def configure_logging(settings: Settings, *, stream: Any = None) -> logging.Handler:
    """Replace the root logger's handlers with one stderr handler as ``settings.logging`` says.
    Returns the handler (tests read what it writes)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_certqueue", False) or not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._certqueue = True  # type: ignore[attr-defined]
    handler.setFormatter(json_formatter() if settings.logging.json_format else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, settings.logging.level))
    from certqueue.logsafe import install

    install(root)
    if "celery" in sys.modules:
        # else the Celery app connects them when it is built (certqueue.celery_app.create_app):
        # a CLI read command does not pay for importing Celery
        connect_celery()
    if settings.monitoring.tracing:
        setup_tracing(settings)
    return handler


def _task_fields(task: Any, args: Any, kwargs: Any) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        bound = inspect.signature(task.run).bind_partial(*(args or ()), **(kwargs or {})).arguments
    except (TypeError, ValueError):
        bound = dict(kwargs or {})
    cid = bound.get("certificate_id")
    for value in bound.values():  # a versioned payload ({"v": 1, "certificate_id": ...}) or a batch
        if cid is not None:
            break
        if isinstance(value, dict):
            cid = value.get("certificate_id")
        elif isinstance(value, list | tuple) and len(value) == 1:  # a batch of one: that id
            one = value[0]
            cid = one.get("certificate_id") if isinstance(one, dict) else one
    if isinstance(cid, str):
        fields["certificate_id"] = cid
    if isinstance(bound.get("region"), str):
        fields["region"] = bound["region"]
    return fields


def connect_celery() -> None:
    """Task context in every log line of a task, and Celery leaving the root logger as set here."""
    global _celery_connected
    if _celery_connected:
        return
    from celery import signals

    def _keep_ours(**_kw: Any) -> None:
        """Connected: Celery leaves the root logger as configured here."""

    def _prerun(
        task_id: str | None = None, task: Any = None, args: Any = None, kwargs: Any = None, **_kw: Any
    ) -> None:
        if not task_id or task is None:
            return
        fields = {"task_id": task_id, "task": str(task.name), **_task_fields(task, args, kwargs)}
        _task_tokens[task_id] = _context.set({**_context.get(), **fields})

    def _postrun(task_id: str | None = None, **_kw: Any) -> None:
        token = _task_tokens.pop(task_id or "", None)
        if token is not None:
            with contextlib.suppress(ValueError):  # set in another context (thread pools)
                _context.reset(token)

    signals.setup_logging.connect(_keep_ours, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
    _celery_connected = True


# --- tracing (the ``tracing`` extra) ----------------------------------------------------------------

_tracing_on = False


def setup_tracing(settings: Settings, *, exporter: Any = None, service: str | None = None) -> Any:
    """OpenTelemetry: a tracer provider exporting over OTLP/HTTP (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    or ``exporter``), and instrumentation of FastAPI (the API), Celery (publish and run, with the
    context carried in the message headers) and requests (every ACME call). Returns the provider."""
    global _tracing_on
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            "monitoring.tracing needs the tracing extra: pip install 'certqueue[tracing]'",
            key="monitoring.tracing",
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service or "certqueue"}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    for instrumentor in (CeleryInstrumentor(), FastAPIInstrumentor(), RequestsInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
    _tracing_on = True
    return provider
