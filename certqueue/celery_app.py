"""The Celery application: queues, routes, reliability settings and the base task.

Queues: ``scan`` (beat's periodic work), ``acme`` (orders, HTTP-01, answering, finalize, download,
revoke), ``dns`` (DNS-01 present / visibility / cleanup), ``events`` (lifecycle events out to
subscribers), ``propagate.<region>`` (one per configured
region, so a region's credentials exist only where its pool runs). Missing queues are never created
implicitly: a task routed to an unknown region fails loudly instead of waiting forever.

Reliability: messages are acknowledged after the task ran (``acks_late``) and re-queued when the
worker process dies (``reject_on_worker_lost``); prefetch 1 so a killed worker loses at most the
task it was running; time limits stay below the broker's visibility timeout, which stays above the
longest retry countdown. The database is the truth: a lost message is found again by the reconciler.

The embedded default needs no server: certqueue's own file transport under ``var/broker``
(certqueue.embedded_broker: no consumer ever reads a half-written message) and a SQLite result
backend (chords poll it). With a Redis broker, Redis is the result backend too (chords count
in Redis).
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from celery import Celery
from kombu import Queue

from certqueue.brokerstate import SENT_AT_HEADER, queue_names
from certqueue.brokerstate import broker_urls as broker_urls  # re-exported: its old home
from certqueue.brokerstate import region_queue as region_queue  # re-exported: where workers look
from certqueue.config import Settings, get_settings

PUBLIC_TASKS = ("certqueue.issue", "certqueue.renew", "certqueue.revoke", "certqueue.propagate")

#: the longest countdown any task uses (seconds); visibility timeout must exceed it
MAX_COUNTDOWN = 900
TASK_SOFT_TIME_LIMIT = 240
TASK_TIME_LIMIT = 300


def make_queues(settings: Settings) -> list[Queue]:
    return [Queue(n, routing_key=n) for n in queue_names(settings)]


def configure(app: Celery, settings: Settings) -> None:
    url, backend, opts = broker_urls(settings)
    if settings.broker.visibility_timeout <= MAX_COUNTDOWN + TASK_TIME_LIMIT:
        raise ValueError("broker.visibility_timeout must exceed the longest countdown plus the time limit")
    app.conf.update(
        broker_url=url,
        result_backend=backend or None,
        broker_transport_options=opts,
        result_backend_transport_options=opts if backend.startswith("redis") else {},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_create_missing_queues=False,
        task_queues=make_queues(settings),
        task_default_queue="acme",
        task_routes={
            "certqueue.issue": {"queue": "acme"},
            "certqueue.renew": {"queue": "acme"},
            "certqueue.revoke": {"queue": "acme"},
            "certqueue.propagate": {"queue": "acme"},
            "certqueue.acme.*": {"queue": "acme"},
            "certqueue.dns.*": {"queue": "dns"},
            "certqueue.scan.*": {"queue": "scan"},
            "certqueue.removal.start": {"queue": "acme"},
            "certqueue.removal.record": {"queue": "acme"},
            # certqueue.removal.remove and certqueue.drift.check go to propagate.<region> explicitly
            "certqueue.events.*": {"queue": "events"},
            # certqueue.propagate.deploy is sent with an explicit queue: propagate.<region>
        },
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT,
        task_time_limit=TASK_TIME_LIMIT,
        # Each of these costs a Redis write per execution and buys nothing the database does not
        # record: no STARTED results, no task arguments copied into results. Task events are sent
        # only when monitoring.task_events asks for them, or while Flower runs (it broadcasts
        # enable_events to every worker); the "sent" event is the publisher's, so it follows the
        # setting alone.
        task_track_started=False,
        task_send_sent_event=settings.monitoring.task_events,
        worker_send_task_events=settings.monitoring.task_events,
        result_expires=24 * 3600,
        result_extended=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        timezone="UTC",
        enable_utc=True,
    )


#: the modules whose tasks a worker runs, by name: the app is the root of the graph, and no task
#: module imports it (or another task module); follow-ups are sent by task name
TASK_MODULES = (
    "certqueue.tasks.acme",
    "certqueue.tasks.dns",
    "certqueue.tasks.drift",
    "certqueue.tasks.events",
    "certqueue.tasks.propagate",
    "certqueue.tasks.removal",
    "certqueue.tasks.scan",
)

_stamping = False


def stamp_sent_at() -> None:
    """Stamp every message this process publishes with its send time (the queues' oldest-message
    age, certqueue.brokerstate). Idempotent."""
    global _stamping
    if _stamping:
        return
    from celery import signals

    def _stamp(headers: dict[str, Any] | None = None, **_kw: Any) -> None:
        if headers is not None:
            headers.setdefault(SENT_AT_HEADER, time.time())

    signals.before_task_publish.connect(_stamp, weak=False)
    _stamping = True


def create_app(settings: Settings | None = None, *, tasks: bool = True) -> Celery:
    """The configured app. ``tasks=False``: an app that only sends (tasks by name), without the task
    modules and the worker-side hooks, for a process that has nothing to run (the CLI's nudge)."""
    settings = settings or get_settings()
    app = Celery("certqueue", set_as_current=tasks)
    configure(app, settings)
    stamp_sent_at()
    if not tasks:
        return app
    from certqueue.logconfig import connect_celery
    from certqueue.metrics import install_celery_hooks  # task run time

    connect_celery()
    install_celery_hooks()
    for name in TASK_MODULES:  # each registers its tasks (shared_task) as it is imported
        importlib.import_module(name)
    return app


class _LazyApp:
    """The process-wide app, built on first use so settings are read after the CLI set them."""

    _app: Celery | None = None
    _sender: Celery | None = None

    def get(self) -> Celery:
        if self._app is None:
            self._app = create_app()
        return self._app

    def for_sending(self) -> Celery:
        """The process's app if it is built, else one that only sends (built once): publishing a
        task by name needs no task module, and importing them all costs a short-lived process
        (the CLI) more than the rest of its command."""
        if self._app is not None:
            return self._app
        if self._sender is None:
            self._sender = create_app(tasks=False)
        return self._sender

    def reset(self) -> None:
        self._app = None
        self._sender = None


lazy_app = _LazyApp()
